"""Latents <-> pixels (mirage.autoencoder): PRXPipeline's conversions and tiling."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.image_processor import PixArtImageProcessor, VaeImageProcessor
from torch import nn

from mirage.autoencoder import TILE_PIXELS, decode_latents, images_to_latents, latents_to_images, to_unit_range
from mirage.configs import FluxVAEConfig
from mirage.vae_flux import FluxVAE
from parity import assert_parity, randomize_

TINY = {"block_out_channels": (32, 48, 64), "norm_num_groups": 8, "layers_per_block": 1}  # f = 4


def tiny_pair(seed: int = 0) -> tuple[FluxVAE, AutoencoderKL]:
    ref = AutoencoderKL(
        **TINY,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    randomize_(ref, seed).eval()
    ours = FluxVAE(FluxVAEConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


class LocalVAE(nn.Module):
    """A stand-in VAE in which every output pixel depends on one latent cell only, so tiling must not change
    its output at all; it counts its calls and records the input sizes."""

    fp16_safe = True

    def __init__(self, f: int):
        super().__init__()
        self.spatial_compression, self.latent_channels = f, 4
        self.config = SimpleNamespace(scaling_factor=0.7, shift_factor=0.2)
        self.mix = nn.Conv2d(4, 3, 1)
        self.unmix = nn.Conv2d(3, 4, 1)
        self.calls: list[tuple[int, int]] = []

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(z.shape[-2:]))
        return torch.tanh(F.interpolate(self.mix(z), scale_factor=self.spatial_compression, mode="nearest"))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(images.shape[-2:]))
        return self.unmix(F.avg_pool2d(images, self.spatial_compression))


# ---- PRXPipeline's conversions -----------------------------------------------------------------


@torch.no_grad()
def test_latents_to_images_is_prx_post_processing():
    ours, ref = tiny_pair()
    latents = torch.randn(2, 16, 7, 10, generator=torch.Generator().manual_seed(0))
    # PRXPipeline step 8: unscale, decode, image_processor.postprocess to "pt".
    raw = latents / ref.config.scaling_factor + ref.config.shift_factor
    decoded = ref.decode(raw, return_dict=False)[0]
    expected = PixArtImageProcessor(vae_scale_factor=4).postprocess(decoded, output_type="pt")
    images = latents_to_images(ours, latents)
    assert images.shape == (2, 3, 28, 40) and 0 <= images.min() and images.max() <= 1
    assert_parity(images, expected)
    assert_parity(decode_latents(ours, latents), decoded)


@torch.no_grad()
@pytest.mark.parametrize("tiles", [{}, {"tiled": True, "tile_pixels": 16}], ids=["whole", "tiled"])
def test_a_batch_is_coded_one_image_at_a_time(tiles, monkeypatch):
    """The VAE sees one image per call, so a batch takes the activation memory of one image, and each image comes
    out exactly as it would alone."""
    ours, _ = tiny_pair()
    batch_sizes = []
    for name in ("encode", "decode"):
        monkeypatch.setattr(ours, name, lambda x, code=getattr(ours, name): batch_sizes.append(len(x)) or code(x))
    gen = torch.Generator().manual_seed(0)
    latents, images = torch.randn(3, 16, 7, 10, generator=gen), torch.rand(3, 3, 28, 40, generator=gen)
    decoded, encoded = decode_latents(ours, latents, **tiles), images_to_latents(ours, images, **tiles)
    assert set(batch_sizes) == {1}
    for i in range(3):
        assert torch.equal(decoded[i : i + 1], decode_latents(ours, latents[i : i + 1], **tiles))
        assert torch.equal(encoded[i : i + 1], images_to_latents(ours, images[i : i + 1], **tiles))


def test_unit_range_clamps_as_the_image_processor_does():
    """A decoder overshoots [-1, 1] on real images: the pixels saturate (unclamped, to_pil would wrap around)."""
    decoded = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    expected = PixArtImageProcessor(vae_scale_factor=4).postprocess(decoded, output_type="pt")
    assert expected.min() == 0 and expected.max() == 1  # the values do leave the range
    assert torch.equal(to_unit_range(decoded), expected)


@torch.no_grad()
def test_images_to_latents_is_the_inverse_convention():
    ours, ref = tiny_pair()
    images = torch.rand(2, 3, 24, 36, generator=torch.Generator().manual_seed(0))
    # diffusers' preprocessing maps [0, 1] to [-1, 1]; latents are then shifted and scaled for the transformer.
    pixels = VaeImageProcessor(vae_scale_factor=4).preprocess(images)
    expected = (ref.encode(pixels).latent_dist.mean - ref.config.shift_factor) * ref.config.scaling_factor
    assert_parity(images_to_latents(ours, images), expected)


def test_images_to_latents_needs_whole_latent_cells():
    for size in [(64, 60), (60, 64)]:  # width, then height
        with pytest.raises(ValueError, match="multiple"):
            images_to_latents(LocalVAE(8), torch.rand(1, 3, *size))


@torch.no_grad()
def test_conversions_cast_inputs_to_the_vae_dtype():
    vae = LocalVAE(8).to(torch.bfloat16)
    assert latents_to_images(vae, torch.randn(1, 4, 3, 5)).dtype == torch.bfloat16
    assert images_to_latents(vae, torch.rand(1, 3, 24, 40)).dtype == torch.bfloat16
    # Tiles are blended in fp32, and the blend comes back in the VAE's dtype too.
    assert latents_to_images(vae, torch.randn(1, 4, 3, 5), tiled=True, tile_pixels=16).dtype == torch.bfloat16
    assert images_to_latents(vae, torch.rand(1, 3, 24, 40), tiled=True, tile_pixels=16).dtype == torch.bfloat16


# ---- tiling ------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize(
    "f, grid, tile_pixels", [(8, (13, 29), 64), (32, (7, 5), 96), (8, (9, 9), 64), (8, (5, 29), 64), (32, (9, 2), 96)]
)  # the last two: one side shorter than a tile (a single, shorter row or column of tiles)
def test_tiling_is_exact_for_a_local_vae(f, grid, tile_pixels):
    """Tile placement, ramps and normalisation add up to exactly one untiled pass, for any compression."""
    vae = randomize_(LocalVAE(f), seed=f)
    latents = torch.randn(2, 4, *grid, generator=torch.Generator().manual_seed(0))
    images = torch.rand(2, 3, f * grid[0], f * grid[1], generator=torch.Generator().manual_seed(1))
    tiled_decode = latents_to_images(vae, latents, tiled=True, tile_pixels=tile_pixels)
    tiled_encode = images_to_latents(vae, images, tiled=True, tile_pixels=tile_pixels)
    assert len(vae.calls) > 2 and all(max(size) <= tile_pixels for size in vae.calls)  # several tiles both ways
    assert_parity(tiled_decode, latents_to_images(vae, latents, tiled=False), tol=1e-6)
    assert_parity(tiled_encode, images_to_latents(vae, images, tiled=False), tol=1e-6)


@torch.no_grad()
def test_tiles_crossfade_linearly():
    """Two tiles that disagree by 1 everywhere meet in a linear ramp over the overlap, with no step."""
    vae = LocalVAE(8)
    decode = vae.decode
    vae.decode = lambda z: torch.zeros_like(decode(z)) + (len(vae.calls) - 1)  # tile k outputs k
    out = decode_latents(vae, torch.zeros(1, 4, 8, 12), tiled=True, tile_pixels=64)[0, 0, 0]  # one row of pixels
    assert len(vae.calls) == 2  # columns 0-7 and 4-11: an overlap of 4 cells = 32 px, ramps of 2 cells = 16 px
    assert torch.all(out[:32] == 0) and torch.all(out[64:] == 1)
    assert torch.allclose(out[32:64], (torch.arange(32) + 0.5) / 32, atol=1e-6)


@torch.no_grad()
def test_neighbouring_tiles_share_a_quarter_of_a_tile():
    """29 cells in tiles of 8 (64 px at f = 8): the fewest tiles whose neighbours share >= 2 cells, which is 5."""
    vae, starts = LocalVAE(8), []
    vae.config = SimpleNamespace(scaling_factor=1.0, shift_factor=0.0)  # the decoder sees the latents as given
    vae.decode = lambda z: starts.append(int(z[0, 0, 0, 0])) or torch.zeros(1, 3, 8 * z.shape[-2], 8 * z.shape[-1])
    decode_latents(vae, torch.arange(29.0).expand(1, 4, 3, 29), tiled=True, tile_pixels=64)  # cell value = column
    assert len(starts) == 5 and starts[0] == 0 and starts[-1] == 29 - 8
    assert all(8 - (b - a) >= 2 for a, b in zip(starts, starts[1:]))


@torch.no_grad()
def test_tiled_flux_vae_stays_close_to_one_pass():
    """Tiles see their own GroupNorm statistics and attention context, so tiling changes the output a little.

    Tiny Flux-like VAE (f = 4), random weights, 64x96 px in 48 px tiles (2 x 3 of them, overlap >= 12 px).
    Measured: decoded [0, 1] images differ by 0.047 at most, 0.0057 on average; latents (std 0.24) by
    0.033 at most, 0.0038 on average. The bound is twice that.
    """
    vae, _ = tiny_pair(seed=3)
    latents = torch.randn(1, 16, 16, 24, generator=torch.Generator().manual_seed(0))
    one_pass = latents_to_images(vae, latents, tiled=False)
    diff = (latents_to_images(vae, latents, tiled=True, tile_pixels=48) - one_pass).abs()
    assert diff.max() < 0.1 and diff.mean() < 0.01

    images = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    one_pass = images_to_latents(vae, images, tiled=False)
    diff = (images_to_latents(vae, images, tiled=True, tile_pixels=48) - one_pass).abs()
    assert diff.max() < 0.1 and diff.mean() < 0.01


@torch.no_grad()
def test_tiling_switches_on_above_a_1024px_image():
    vae = LocalVAE(8)
    side = TILE_PIXELS // 8
    latents_to_images(vae, torch.zeros(1, 4, side, side))  # 1024 x 1024: one pass
    latents_to_images(vae, torch.zeros(1, 4, side // 2, 2 * side))  # 512 x 2048, same area: one pass
    assert vae.calls == [(side, side), (side // 2, 2 * side)]
    vae.calls.clear()
    latents_to_images(vae, torch.zeros(1, 4, side, side + 1))  # 1024 x 1032: tiled
    assert len(vae.calls) == 2 and all(max(size) <= side for size in vae.calls)
    vae.calls.clear()
    images_to_latents(vae, torch.zeros(1, 3, TILE_PIXELS // 2, 2 * TILE_PIXELS))  # 512 x 2048 encodes in one pass too
    assert vae.calls == [(TILE_PIXELS // 2, 2 * TILE_PIXELS)]
    vae.calls.clear()
    images_to_latents(vae, torch.zeros(1, 3, TILE_PIXELS + 8, TILE_PIXELS))
    assert len(vae.calls) == 2
    vae.calls.clear()
    latents_to_images(vae, torch.zeros(1, 4, side, side + 1), tiled=False)
    images_to_latents(vae, torch.zeros(1, 3, 64, 64), tiled=True, tile_pixels=32)
    assert len(vae.calls) == 1 + 3 * 3  # 8 x 8 cells in tiles of 4, overlap >= 1


def test_tile_size_must_fit_the_compression():
    for tile_pixels in (48, 32):  # not a multiple of f; a single cell, which no neighbour could overlap
        with pytest.raises(ValueError, match="tile_pixels"):
            latents_to_images(LocalVAE(32), torch.zeros(1, 4, 4, 4), tiled=True, tile_pixels=tile_pixels)
