"""DC-AE against diffusers' AutoencoderDC with every weight randomised: encoder and decoder, fp32.

Parity bound: max |ours - ref| <= 2e-5 x max(1, max |ref|).
"""

import dataclasses
import inspect

import pytest
import torch
from diffusers import AutoencoderDC

from mirage import vae_dcae
from mirage.configs import DCAE_SANA_1_0, DCAE_SANA_1_1, DCAEConfig
from mirage.loading import build_model
from mirage.vae_dcae import DCAE
from parity import assert_channels_last_decode, assert_inputs_untouched, assert_norms_match, assert_parity, max_rel_err, randomize_

# mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers/config.json as published (no shortcut or head-activation
# keys, downsample type spelled "Conv").
SANA_1_0_JSON = {
    "_class_name": "AutoencoderDC",
    "_diffusers_version": "0.32.0.dev0",
    "attention_head_dim": 32,
    "decoder_act_fns": "silu",
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "decoder_norm_types": "rms_norm",
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "downsample_block_type": "Conv",
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "in_channels": 3,
    "latent_channels": 32,
    "scaling_factor": 0.41407,
    "upsample_block_type": "interpolate",
}
# The 1.1 release (a retrained decoder) as a recent diffusers saves it: the same values, every key written.
SANA_1_1_JSON = {
    **SANA_1_0_JSON,
    "_diffusers_version": "0.42.1",
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
}

# Tiny configs (downsampling 8x) that between them hold every block and option the port builds.
_TINY = {
    "in_channels": 3,
    "latent_channels": 8,
    "attention_head_dim": 8,
    "encoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "decoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "encoder_block_out_channels": [8, 16, 32, 32],
    "decoder_block_out_channels": [8, 16, 32, 32],
}
TINY_CONFIGS = {
    # sana-1.0 style: strided-conv down, interpolate up, RMS norms, multi-scale q/k/v (two scales once).
    "sana-1.0": {
        **_TINY,
        "encoder_layers_per_block": [1, 1, 2, 1],
        "decoder_layers_per_block": [1, 2, 1, 2],
        "encoder_qkv_multiscales": [[], [], [5], [3, 5]],
        "decoder_qkv_multiscales": [[], [], [5], [5]],
        "downsample_block_type": "Conv",
        "upsample_block_type": "interpolate",
        "decoder_norm_types": "rms_norm",
        "decoder_act_fns": "silu",
        "scaling_factor": 0.41407,
    },
    # sana-1.1 style: every key written; here with the latent-end shortcuts off and a SiLU head.
    "sana-1.1": {
        **_TINY,
        "encoder_layers_per_block": [2, 1, 1, 2],
        "decoder_layers_per_block": [2, 1, 2, 1],
        "encoder_qkv_multiscales": [[], [], [5], [5]],
        "decoder_qkv_multiscales": [[], [], [3], [5]],
        "downsample_block_type": "conv",
        "upsample_block_type": "interpolate",
        "decoder_norm_types": ["rms_norm"] * 4,
        "decoder_act_fns": ["silu"] * 4,
        "encoder_out_shortcut": False,
        "decoder_in_shortcut": False,
        "decoder_conv_act_fn": "silu",
        "scaling_factor": 0.41407,
    },
    # f32c32-in/mix style: empty first stage, pixel (un)shuffle, batch norms and ReLU, single-scale attention.
    "in-mix": {
        **_TINY,
        "encoder_layers_per_block": [0, 1, 2, 1],
        "decoder_layers_per_block": [0, 2, 1, 1],
        "encoder_qkv_multiscales": [[], [], [], []],
        "decoder_qkv_multiscales": [[], [], [], []],
        "downsample_block_type": "pixel_unshuffle",
        "upsample_block_type": "pixel_shuffle",
        "decoder_norm_types": ["batch_norm", "batch_norm", "rms_norm", "batch_norm"],
        "decoder_act_fns": ["relu", "relu", "silu", "silu"],
        "scaling_factor": 0.3189,
    },
}
# Pixel sizes (H, W). With attention_head_dim 8 the 1/8 level attends quadratically at 16x32 and 24x16
# (h*w <= 8 positions there), linearly at the others; the 1/4 level is linear throughout.
SIZES = [(16, 32), (24, 16), (32, 48), (64, 40)]


def reference(config: dict, seed: int = 0) -> AutoencoderDC:
    model = randomize_(AutoencoderDC(**config).eval(), seed)
    for module in model.modules():  # a random running variance can be negative: keep sqrt(var + eps) real
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.abs_()
    return model


def ours_from(ref: AutoencoderDC, config: DCAEConfig, dtype: torch.dtype | None = None) -> DCAE:
    """Our model holding the reference's tensors, built as the pipeline builds it: on meta, loaded strictly."""
    return build_model(lambda: DCAE(config), ref.state_dict(), dtype=dtype)


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def tiny_pair(request):
    config = TINY_CONFIGS[request.param]
    ref = reference(config)
    return ref, ours_from(ref, DCAEConfig.from_diffusers(config))


@torch.no_grad()
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiny_encoder_parity(tiny_pair, size):
    ref, ours = tiny_pair
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    assert_parity(ours.encode(images), ref.encode(images).latent)


@torch.no_grad()
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiny_decoder_parity(tiny_pair, size):
    ref, ours = tiny_pair
    f = ours.spatial_compression
    latents = 2.5 * torch.randn(2, 8, size[0] // f, size[1] // f, generator=torch.Generator().manual_seed(2))
    assert_parity(ours.decode(latents), ref.decode(latents).sample)


def test_norms_match_reference_where_eps_matters(tiny_pair):
    ref, ours = tiny_pair
    assert assert_norms_match(ours, ref) > 0


@torch.no_grad()
def test_attention_matches_the_reference_where_eps_matters(tiny_pair):
    """At inputs of size 1e-3 the ReLU kernel's normaliser is small enough for its eps to show; the whole-model
    tests, at activations of size ~1, cannot tell 1e-15 from 1e-6."""
    ref, ours = tiny_pair
    ref_layers = dict(ref.named_modules())
    layers = [(name, m) for name, m in ours.named_modules() if isinstance(m, vae_dcae.MultiscaleReLUAttention)]
    gen = torch.Generator().manual_seed(4)
    for name, attention in layers:
        for h, w in ((8, 8), (2, 2)):  # more positions than the head dim (the linear form), then fewer (quadratic)
            x = 1e-3 * torch.randn(2, attention.to_q.in_features, h, w, generator=gen)
            assert_parity(attention(x), ref_layers[name](x))
    assert layers


@torch.no_grad()
def test_tiny_sizes_reach_both_attention_forms(tiny_pair, monkeypatch):
    """The parity sizes run the linear form and the quadratic one, in the encoder and in the decoder."""
    calls = []
    for form in ("relu_linear_attention", "relu_quadratic_attention"):
        original = getattr(vae_dcae, form)
        monkeypatch.setattr(vae_dcae, form, lambda q, k, v, eps, f=original, n=form: calls.append(n) or f(q, k, v, eps))
    _, ours = tiny_pair
    for h, w in SIZES:
        # The 1/8 level has (h/8)(w/8) positions against a head dim of 8; the 1/4 level always has more.
        expected = {"relu_linear_attention"} | ({"relu_quadratic_attention"} if (h // 8) * (w // 8) <= 8 else set())
        for run in (lambda: ours.encode(torch.zeros(1, 3, h, w)), lambda: ours.decode(torch.zeros(1, 8, h // 8, w // 8))):
            calls.clear()
            run()
            assert set(calls) == expected, (h, w)


def test_attention_forms_agree_with_explicit_formula():
    """Both forms compute out_i = sum_j v_j relu(k_j).relu(q_i) / sum_j relu(k_j).relu(q_i)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 8, 6, dtype=torch.float64, generator=gen) for _ in range(3))  # [B, n, d, L]
    q, k = q.relu(), k.relu()
    weights = torch.einsum("bndj,bndi->bnji", k, q)  # [B, n, L keys, L queries]
    expected = torch.einsum("bndj,bnji->bndi", v, weights / weights.sum(dim=2, keepdim=True))
    for form in (vae_dcae.relu_linear_attention, vae_dcae.relu_quadratic_attention):
        torch.testing.assert_close(form(q, k, v, eps=1e-15), expected, rtol=1e-12, atol=1e-12)


def test_published_configs():
    assert DCAEConfig.from_diffusers(SANA_1_0_JSON) == DCAE_SANA_1_0
    assert DCAEConfig.from_diffusers(SANA_1_1_JSON) == DCAE_SANA_1_1 == DCAEConfig()
    assert DCAE_SANA_1_1.spatial_compression == 32 and DCAE_SANA_1_1.latent_channels == 32
    assert (DCAE_SANA_1_1.scaling_factor, DCAE_SANA_1_1.shift_factor) == (0.41407, 0.0)
    for config in (DCAE_SANA_1_1, *(DCAEConfig.from_diffusers(c) for c in TINY_CONFIGS.values())):
        assert DCAEConfig(**dataclasses.asdict(config)) == config


def test_keys_left_out_take_diffusers_defaults():
    """A config.json without upsample_block_type builds what AutoencoderDC would: its default, not sana's."""
    defaults = inspect.signature(AutoencoderDC.__init__).parameters
    sparse = {k: v for k, v in SANA_1_0_JSON.items() if k != "upsample_block_type"}
    assert DCAEConfig.from_diffusers(sparse).upsample_block_type == defaults["upsample_block_type"].default


def test_full_size_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        ours = DCAE(DCAE_SANA_1_1)
        ref = AutoencoderDC(**SANA_1_0_JSON)
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    # The published diffusion_pytorch_model.safetensors is 1.25 GB of fp32 tensors.
    assert sum(p.numel() for p in ours.encoder.parameters()) == 153_027_104
    assert sum(p.numel() for p in ours.parameters()) == 312_250_275
    assert ours_shapes["decoder.up_blocks.5.1.attn.to_qkv_multiscale.0.proj_out.weight"] == (3072, 32, 1, 1)


@torch.no_grad()
def test_full_size_parity_at_small_size():
    """Both published configs (they are one) at full size: decode 2x2 latents, encode a 64x64 image."""
    with torch.device("meta"):  # skip the reference's own initialisation: every tensor is overwritten
        ref = AutoencoderDC(**SANA_1_0_JSON).eval()
    ref = randomize_(ref.to_empty(device="cpu"), seed=0)
    ours = ours_from(ref, DCAE_SANA_1_1)
    gen = torch.Generator().manual_seed(4)
    latents = 2.5 * torch.randn(1, 32, 2, 2, generator=gen)
    assert_parity(ours.decode(latents), ref.decode(latents).sample)
    images = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    assert_parity(ours.encode(images), ref.encode(images).latent)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_runs_close_to_fp32(dtype):
    ref = reference(TINY_CONFIGS["sana-1.0"])
    config = DCAEConfig.from_diffusers(TINY_CONFIGS["sana-1.0"])
    ours, half = ours_from(ref, config), ours_from(ref, config, dtype)
    latents = torch.randn(1, 8, 3, 4, generator=torch.Generator().manual_seed(5))
    out = half.decode(latents.to(dtype))
    assert out.dtype == dtype
    assert max_rel_err(out.float(), ours.decode(latents)) < 5e-2
    images = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    assert max_rel_err(half.encode(images.to(dtype)).float(), ours.encode(images)) < 5e-2


def test_encode_rejects_sizes_off_the_grid():
    model = DCAE(DCAEConfig.from_diffusers(TINY_CONFIGS["sana-1.0"]))
    for size in [(32, 36), (36, 32)]:
        with pytest.raises(ValueError, match="multiples of 8"):
            model.encode(torch.zeros(1, 3, *size))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"upsample_block_type": "InterpolateConv"}, "upsample_block_type"),
        ({"downsample_block_type": "avgpool"}, "downsample_block_type"),
        ({"decoder_norm_types": "layer_norm"}, "decoder_norm_types"),
        ({"decoder_act_fns": "gelu"}, "activations"),
        ({"encoder_block_types": "EViTS5_GLU"}, "block type"),
        ({"block_out_channels": [8, 16]}, "unsupported AutoencoderDC config keys: block_out_channels"),
        ({"encoder_qkv_multiscales": [[5], [], [5], [3, 5]]}, "EfficientViTBlock stages only"),
        ({"decoder_qkv_multiscales": [[], [], [4], [5]]}, "odd"),
        ({"decoder_layers_per_block": [1, 0, 1, 2]}, "only the first stage may have 0 layers"),
        ({"attention_head_dim": 12}, "not divisible by attention_head_dim"),
        ({"latent_channels": 12}, "multiples of latent_channels"),
        ({"encoder_block_out_channels": [8, 16, 32, 16, 32]}, "one entry per stage"),
        ({"encoder_block_out_channels": [8, 24, 32, 32]}, "regrouped"),
    ],
)
def test_unsupported_configs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        DCAEConfig.from_diffusers({**TINY_CONFIGS["sana-1.0"], **change})


@torch.no_grad()
def test_in_place_temporaries_leave_inputs_untouched(tiny_pair):
    """Activations, norms and residual sums run in place on temporaries only: inputs stay, calls repeat exactly."""
    _, ours = tiny_pair
    gen = torch.Generator().manual_seed(3)
    assert_inputs_untouched(ours, torch.randn(2, 8, 4, 6, generator=gen), torch.rand(2, 3, 32, 48, generator=gen) * 2 - 1)


@torch.no_grad()
def test_channels_last_decode_is_the_same_decode(tiny_pair):
    _, ours = tiny_pair
    assert_channels_last_decode(ours, 2.5 * torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(4)))
