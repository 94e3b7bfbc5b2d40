"""Flux VAE (mirage.vae_flux) against diffusers' AutoencoderKL, every weight randomised."""

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL

from mirage.configs import FluxVAEConfig
from mirage.vae_flux import FluxVAE
from parity import assert_channels_last_decode, assert_inputs_untouched, assert_norms_match, assert_parity, max_rel_err, randomize_

# vae/config.json of black-forest-labs/FLUX.1-dev, as the PRX Flux checkpoints ship it.
FLUX1_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.30.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def tiny_kl_config(**overrides) -> dict:
    """A three-level (f = 4) AutoencoderKL config small enough for CPU parity tests."""
    return {
        **FLUX1_VAE_CONFIG,
        "block_out_channels": [32, 48, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "norm_num_groups": 8,
        "layers_per_block": 1,
        **overrides,
    }


def pair(config: dict, seed: int = 0) -> tuple[FluxVAE, AutoencoderKL]:
    """The reference built from `config` with every weight randomised, and ours holding the same state dict."""
    ref = randomize_(AutoencoderKL.from_config(config), seed).eval()
    ours = FluxVAE(FluxVAEConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


# ---- config -----------------------------------------------------------------------------------


def test_published_config_is_the_default():
    assert FluxVAEConfig.from_diffusers(FLUX1_VAE_CONFIG) == FluxVAEConfig()


def test_config_round_trips_through_asdict():
    config = FluxVAEConfig(block_out_channels=[32, 64], norm_num_groups=8, use_quant_conv=True)
    assert config.block_out_channels == (32, 64)
    assert FluxVAEConfig(**dataclasses.asdict(config)) == config


def test_sparse_sd_style_config_gets_diffusers_defaults():
    config = FluxVAEConfig.from_diffusers(
        {
            "_class_name": "AutoencoderKL",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "latent_channels": 4,
            "layers_per_block": 2,
        }
    )
    assert (config.use_quant_conv, config.use_post_quant_conv, config.mid_block_add_attention) == (True, True, True)
    assert (config.scaling_factor, config.shift_factor) == (0.18215, 0.0)


@torch.no_grad()
@pytest.mark.parametrize(
    "config, compression",
    [
        ({"_class_name": "AutoencoderKL"}, 1),  # every key left out: one level of 64, latent 4, a resnet per level
        (
            {"in_channels": 4, "out_channels": 2, "latent_channels": 6, "block_out_channels": [16, 24, 24, 32, 32],
             "down_block_types": ["DownEncoderBlock2D"] * 5, "up_block_types": ["UpDecoderBlock2D"] * 5,
             "layers_per_block": 1, "norm_num_groups": 8, "use_quant_conv": True, "use_post_quant_conv": False},
            16,
        ),
    ],
    ids=["diffusers-defaults", "five-levels-asymmetric"],
)  # fmt: skip
def test_every_config_key_builds_what_diffusers_builds(config, compression):
    """from_diffusers maps each key to the model diffusers builds from it, including the defaults it fills in for a
    key left out; asymmetric settings (in != out channels, a quant conv without a post-quant conv) tell swapped keys
    apart."""
    ref = randomize_(AutoencoderKL.from_config(config), seed=compression).eval()
    ours = FluxVAE(FluxVAEConfig.from_diffusers(config)).eval()  # the file's dict, not the one diffusers filled in
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert (ours.spatial_compression, ours.latent_channels) == (compression, ref.config.latent_channels)
    gen = torch.Generator().manual_seed(compression)
    z = torch.randn(1, ref.config.latent_channels, 3, 2, generator=gen) * 2
    assert_parity(ours.decode(z), ref.decode(z).sample)
    images = torch.rand(1, ref.config.in_channels, 3 * compression, 2 * compression, generator=gen) * 2 - 1
    assert_parity(ours.encode(images), ref.encode(images).latent_dist.mean)


@pytest.mark.parametrize(
    "change",
    [
        {"_class_name": "AutoencoderDC"},
        {"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]},
        {"up_block_types": ["UpDecoderBlock2D"] * 3},
        {"act_fn": "gelu"},
        {"norm_type": "spatial"},
    ],
)
def test_from_diffusers_rejects_what_we_do_not_build(change):
    with pytest.raises(ValueError):
        FluxVAEConfig.from_diffusers({**FLUX1_VAE_CONFIG, **change})


@pytest.mark.parametrize(
    "change",
    [
        {"norm_num_groups": 48},
        {"block_out_channels": (48, 64)},  # 64 divides into the 32 groups, 48 does not
        {"block_out_channels": ()},
        {"layers_per_block": 0},
        {"scaling_factor": 0.0},
    ],
)
def test_config_checks_invariants(change):
    with pytest.raises(ValueError):
        FluxVAEConfig(**change)


# ---- full-size model ---------------------------------------------------------------------------


def test_full_config_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        ours = FluxVAE()
        ref = AutoencoderKL.from_config(FLUX1_VAE_CONFIG)
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 83_819_683  # FLUX.1 ae: 34.3M encoder, 49.5M decoder
    assert (ours.spatial_compression, ours.latent_channels) == (8, 16)


@torch.no_grad()
def test_full_config_forward_matches_reference():
    ref = randomize_(AutoencoderKL.from_config(FLUX1_VAE_CONFIG), seed=1).eval()
    with torch.device("meta"):
        ours = FluxVAE()
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # as mirage.loading builds models
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)) * 2
    decoded = ours.decode(z)
    assert decoded.shape == (1, 3, 32, 32)
    assert_parity(decoded, ref.decode(z).sample)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert_parity(ours.encode(images), ref.encode(images).latent_dist.mean)


# ---- tiny-config parity ------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize(
    "overrides, grid",
    [
        ({}, (4, 4)),
        ({}, (5, 9)),
        ({"layers_per_block": 2}, (12, 7)),
        ({"use_quant_conv": True, "use_post_quant_conv": True, "scaling_factor": 0.18215}, (6, 5)),
        ({"mid_block_add_attention": False, "latent_channels": 4}, (3, 8)),
    ],
    ids=["4x4", "5x9", "two-layers-12x7", "quant-convs-6x5", "no-mid-attention-3x8"],
)
def test_tiny_decoder_and_encoder_match_reference(overrides, grid):
    ours, ref = pair(tiny_kl_config(**overrides), seed=sum(grid))
    gen = torch.Generator().manual_seed(grid[0] * 100 + grid[1])
    z = torch.randn(2, ref.config.latent_channels, *grid, generator=gen) * 2
    decoded = ours.decode(z)
    assert decoded.shape == (2, 3, 4 * grid[0], 4 * grid[1])
    assert_parity(decoded, ref.decode(z).sample)

    images = torch.rand(2, 3, 4 * grid[0], 4 * grid[1], generator=gen) * 2 - 1
    latents = ours.encode(images)
    assert latents.shape == z.shape
    assert_parity(latents, ref.encode(images).latent_dist.mean)


def test_norms_match_reference_where_eps_matters():
    ours, ref = pair(tiny_kl_config())
    assert assert_norms_match(ours, ref) == len([m for m in ref.modules() if isinstance(m, torch.nn.GroupNorm)])


@torch.no_grad()
def test_parity_catches_a_one_percent_attention_temperature_error():
    ours, ref = pair(tiny_kl_config())
    ours.decoder.mid_block.attentions[0].to_q.weight.mul_(1.01)
    z = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError):
        assert_parity(ours.decode(z), ref.decode(z).sample)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference_and_stays_near_fp32(dtype):
    ours, ref = pair(tiny_kl_config())
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    images = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fp32_decoded, fp32_latents = ours.decode(z), ours.encode(images)
    ours, ref, z, images = ours.to(dtype), ref.to(dtype), z.to(dtype), images.to(dtype)
    decoded, latents = ours.decode(z), ours.encode(images)
    assert decoded.dtype == latents.dtype == dtype
    # The same kernels in the same order: equal to the reference up to (at most) a rounding step (measured:
    # 8.8e-3 in bf16, 8.9e-4 in fp16).
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert_parity(decoded, ref.decode(z).sample, tol=tol)
    assert_parity(latents, ref.encode(images).latent_dist.mean, tol=tol)
    # Rounding, not a bug: measured 0.009 (bf16) and 0.005 (fp16) after ~15 layers.
    assert max_rel_err(decoded, fp32_decoded) < 0.05
    assert max_rel_err(latents, fp32_latents) < 0.05


@torch.no_grad()
def test_in_place_temporaries_leave_inputs_untouched():
    """SiLU and the residual sums run in place on temporaries only: inputs stay as they were, calls repeat exactly."""
    ours, _ = pair(tiny_kl_config(), seed=5)
    gen = torch.Generator().manual_seed(5)
    assert_inputs_untouched(ours, torch.randn(2, 16, 4, 6, generator=gen), torch.rand(2, 3, 16, 24, generator=gen) * 2 - 1)


@torch.no_grad()
def test_channels_last_decode_is_the_same_decode():
    ours, _ = pair(tiny_kl_config(), seed=6)
    assert_channels_last_decode(ours, torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(6)) * 2)
