"""The transformer against diffusers' PRXTransformer2DModel: tiny configs with every weight randomised, and the
full published presets on the meta device."""

import json
from dataclasses import asdict, replace

import pytest
import torch
from diffusers import PRXTransformer2DModel

from mirage.configs import PRX_DCAE, PRX_FLUX, TransformerConfig
from mirage.loading import CheckpointError, build_model, read_safetensors
from mirage.transformer import MirageTransformer, rope_table
from parity import assert_norms_match, assert_parity, max_rel_err, randomize_

FLUX_TINY = replace(PRX_FLUX, context_in_dim=48, hidden_size=64, num_heads=4, depth=2, axes_dim=(8, 8))
DCAE_TINY = replace(FLUX_TINY, in_channels=32, patch_size=1)
# Every optional field of the reference, an uneven RoPE split and non-default constants.
EXTRAS_TINY = replace(
    FLUX_TINY, axes_dim=(6, 10), theta=500, mlp_ratio=2.75, time_max_period=5000, bottleneck_size=24,
    resolution_embeds=True,
)
TINY = {"flux": FLUX_TINY, "dcae": DCAE_TINY, "extras": EXTRAS_TINY}


def reference(config: TransformerConfig) -> PRXTransformer2DModel:
    return PRXTransformer2DModel(**{**asdict(config), "axes_dim": list(config.axes_dim)})


def make_pair(config: TransformerConfig, seed: int = 0) -> tuple[MirageTransformer, PRXTransformer2DModel]:
    """The reference with ALL weights random (it zero-initialises its modulation), and ours loaded from it strictly."""
    ref = randomize_(reference(config), seed).eval()
    ours = MirageTransformer(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def inputs(config: TransformerConfig, batch: int = 3, height: int = 6, width: int = 4, seed: int = 1):
    """Non-square latents (h != w), per-row sigmas, and 10 text tokens left-padded to different lengths per row
    (7, 4 and 2 real tokens: the first 3 columns are padding in every row)."""
    g = torch.Generator().manual_seed(seed)
    p = config.patch_size
    latents = torch.randn(batch, config.in_channels, height * p, width * p, generator=g)
    sigma = torch.rand(batch, generator=g)
    text = torch.randn(batch, 10, config.context_in_dim, generator=g)
    lengths = torch.tensor([7, 4, 2, 10][:batch])
    mask = torch.arange(10) >= 10 - lengths[:, None]  # [B, 10]
    return latents, sigma, text, mask


def ref_forward(ref, latents, sigma, text, mask):
    return ref(latents, sigma, text, mask, return_dict=False)[0]


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_parity_with_padding_of_different_lengths(name):
    ours, ref = make_pair(TINY[name])
    latents, sigma, text, mask = inputs(TINY[name])
    context = ours.encode_text(text, mask)
    assert context.keys[0].shape[2] == 7 and context.mask is not None  # trimmed to the longest row, masks kept
    assert_parity(ours(latents, sigma, context), ref_forward(ref, latents, sigma, text, mask))


@torch.no_grad()
def test_cached_text_is_reused_across_steps():
    ours, ref = make_pair(FLUX_TINY, seed=2)
    latents, _, text, mask = inputs(FLUX_TINY)
    context = ours.encode_text(text, mask)
    for step, sigma in enumerate([1.0, 0.55, 0.0089]):
        x = latents + step
        s = torch.full((3,), sigma)
        assert_parity(ours(x, s, context), ref_forward(ref, x, s, text, mask))


@torch.no_grad()
def test_unpadded_text_needs_no_mask():
    ours, ref = make_pair(DCAE_TINY, seed=3)
    latents, sigma, text, _ = inputs(DCAE_TINY, batch=2)
    full = torch.ones(2, 10, dtype=torch.bool)
    expected = ref_forward(ref, latents, sigma, text, None)
    for mask in (full, None):
        context = ours.encode_text(text, mask)
        assert context.mask is None and context.keys[0].shape[2] == 10
        assert_parity(ours(latents, sigma, context), expected)
    assert_parity(ours(latents, sigma, ours.encode_text(text, full)), ref_forward(ref, latents, sigma, text, full))


@torch.no_grad()
def test_a_0_1_integer_mask_is_a_bool_mask():
    """transformers' tokenizers give attention masks as 0/1 integers: read as True/False, never as SDPA's additive
    float bias (which would attend to padding) nor refused."""
    ours, _ = make_pair(FLUX_TINY, seed=12)
    latents, sigma, text, mask = inputs(FLUX_TINY)
    expected = ours(latents, sigma, ours.encode_text(text, mask))
    for as_numbers in (mask.long(), mask.float()):
        context = ours.encode_text(text, as_numbers)
        assert context.mask.dtype == torch.bool
        assert torch.equal(ours(latents, sigma, context), expected)


@torch.no_grad()
def test_sdpa_mask_stays_broadcastable(monkeypatch):
    ours, _ = make_pair(FLUX_TINY)
    latents, sigma, text, mask = inputs(FLUX_TINY)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(None if attn_mask is None else (tuple(attn_mask.shape), attn_mask.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ours(latents, sigma, ours.encode_text(text, mask))
    assert seen == [((3, 1, 1, 7 + 24), torch.bool)] * FLUX_TINY.depth  # 7 text keys after trimming, 6 x 4 image keys
    seen.clear()
    ours(latents, sigma, ours.encode_text(text, torch.ones_like(mask)))
    assert seen == [None] * FLUX_TINY.depth


@torch.no_grad()
def test_modulation_precomputed_for_a_schedule():
    ours, ref = make_pair(EXTRAS_TINY, seed=4)
    latents, _, text, mask = inputs(EXTRAS_TINY)
    context = ours.encode_text(text, mask)
    sigmas = torch.tensor([1.0, 0.8, 0.3, 0.02])
    mods = ours.modulate(sigmas, *latents.shape[-2:])
    assert mods.blocks.shape == (EXTRAS_TINY.depth, 6, 4, 1, EXTRAS_TINY.hidden_size)
    for i, sigma in enumerate(sigmas):
        precomputed = ours.forward_modulated(latents, mods.step(i), context)
        per_step = ours(latents, sigma.expand(3), context)
        assert max_rel_err(precomputed, per_step) <= 1e-6
        assert_parity(precomputed, ref_forward(ref, latents, sigma.expand(3), text, mask))


def test_rope_table_is_fp32_and_cached():
    table = rope_table(3, 5, (8, 8), 10000, torch.device("cpu"))
    assert table.dtype == torch.complex64 and table.shape == (15, 8)  # complex64: fp32 cos and sin
    assert rope_table(3, 5, (8, 8), 10000, torch.device("cpu")) is table


@pytest.mark.parametrize("config", [PRX_FLUX, PRX_DCAE], ids=["flux", "dcae"])
def test_full_preset_matches_reference_keys_shapes_and_size(config):
    with torch.device("meta"):
        ours, ref = MirageTransformer(config), reference(config)
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert list(ours_shapes) == list(ref_shapes)
    assert ours_shapes == ref_shapes
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in ref.parameters())
    assert 1.16e9 < n_params < 1.18e9  # "1.3B" on the model cards is rounded


def test_presets_are_the_published_hyper_parameters():
    """The published transformer is PRXTransformer2DModel's default one (hidden 1792, 28 heads of 64, depth 16, MLP
    6272, text width 2304, RoPE axes [32, 32] with theta 10000, sigma x 1000): the parameter count alone cannot tell
    28 heads of 64 from 14 of 128."""
    with torch.device("meta"):
        ref = PRXTransformer2DModel()  # its defaults, axes_dim [32, 32] included (its config stores None)
    config = PRX_FLUX
    assert (config.in_channels, config.patch_size) == (ref.in_channels, ref.patch_size) == (16, 2)
    assert (config.hidden_size, config.num_heads) == (ref.hidden_size, ref.num_heads) == (1792, 28)
    assert config.head_dim == 64
    assert config.depth == len(ref.blocks) == 16 and config.context_in_dim == ref.txt_in.in_features == 2304
    assert int(config.hidden_size * config.mlp_ratio) == ref.blocks[0].gate_proj.out_features == 6272
    assert config.axes_dim == tuple(ref.pe_embedder.axes_dim) == (32, 32)
    assert config.theta == ref.pe_embedder.theta == 10000
    assert (config.time_factor, config.time_max_period) == (ref.time_factor, ref.time_max_period) == (1000.0, 10000)
    assert (config.bottleneck_size, config.resolution_embeds) == (None, False)
    assert PRX_DCAE == replace(PRX_FLUX, in_channels=32, patch_size=1)


@torch.no_grad()
def test_reference_checkpoint_folder_loads_strictly(tmp_path):
    _, ref = make_pair(EXTRAS_TINY, seed=5)
    ref.save_pretrained(tmp_path)
    config = TransformerConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    assert config == EXTRAS_TINY
    state_dict = read_safetensors(tmp_path / "diffusion_pytorch_model.safetensors")
    ours = build_model(lambda: MirageTransformer(config), state_dict)
    # For inference: a model run outside no_grad (jobs.Trajectory.strips decodes so) must not keep its activations.
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    latents, sigma, text, mask = inputs(config)
    assert_parity(ours(latents, sigma, ours.encode_text(text, mask)), ref_forward(ref, latents, sigma, text, mask))
    state_dict["txt_in.weight"] = state_dict["txt_in.weight"].int()
    message = r"not floating point: txt_in\.weight \(int32\) \(1 in all\): convert the checkpoint again$"
    with pytest.raises(CheckpointError, match=message):
        build_model(lambda: MirageTransformer(config), state_dict)


def test_a_state_dict_that_does_not_fit_names_five_keys_of_each_kind_with_their_count():
    with torch.device("meta"):
        state_dict = MirageTransformer(EXTRAS_TINY).state_dict()
    missing, unexpected = sorted(state_dict)[:5], [f"extra.{i}" for i in range(6)]
    state_dict = {k: v for k, v in state_dict.items() if k not in missing} | {k: torch.zeros(1) for k in unexpected}
    with pytest.raises(CheckpointError) as err:
        build_model(lambda: MirageTransformer(EXTRAS_TINY), state_dict, source="a.safetensors")
    assert str(err.value) == (
        f"a.safetensors does not fit the MirageTransformer config: missing keys: {', '.join(missing)} (5 in all); "
        f"unexpected keys: {', '.join(unexpected[:5])} ... (6 in all): convert the checkpoint again"
    )


def test_a_state_dict_error_sorts_key_names_and_keeps_the_models_order_of_shapes():
    """Missing and unexpected keys are listed sorted, whatever order the file holds them in; wrong shapes and
    non-float tensors in the model's order; the kinds always in this order: missing, unexpected, wrong shapes, not
    floating point."""
    with torch.device("meta"):
        expected = MirageTransformer(EXTRAS_TINY).state_dict()
    keys = list(expected)
    misshapen, missing, not_float = keys[-12::2], keys[1:3], keys[3]
    assert misshapen[:5] != sorted(misshapen)[:5]  # the model's order is not the sorted one
    unexpected = [f"extra.{i}" for i in (2, 0, 1)]
    state_dict = {k: v for k, v in expected.items() if k not in missing}
    for k in misshapen:
        state_dict[k] = torch.empty(expected[k].shape[0] + 1, *expected[k].shape[1:], device="meta")
    state_dict[not_float] = torch.empty(expected[not_float].shape, dtype=torch.int32, device="meta")
    state_dict |= {k: torch.zeros(1) for k in unexpected}
    shapes = [f"{k} {(expected[k].shape[0] + 1, *expected[k].shape[1:])} (expected {tuple(expected[k].shape)})"
              for k in misshapen[:5]]  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        build_model(lambda: MirageTransformer(EXTRAS_TINY), state_dict, source="b.safetensors")
    assert str(err.value) == (
        f"b.safetensors does not fit the MirageTransformer config: missing keys: {', '.join(sorted(missing))} "
        f"(2 in all); unexpected keys: extra.0, extra.1, extra.2 (3 in all); wrong shapes: {', '.join(shapes)} ... "
        f"(6 in all); not floating point: {not_float} (int32) (1 in all): convert the checkpoint again"
    )


def test_build_model_casts_floating_tensors_only():
    state_dict = torch.nn.BatchNorm1d(4).state_dict()  # num_batches_tracked: int64
    model = build_model(lambda: torch.nn.BatchNorm1d(4), state_dict, dtype=torch.bfloat16)
    assert model.weight.dtype == model.running_var.dtype == torch.bfloat16
    assert model.num_batches_tracked.dtype == torch.int64


def test_norms_match_reference_where_eps_matters():
    ours, ref = make_pair(FLUX_TINY, seed=3)
    assert assert_norms_match(ours, ref) == 3 * FLUX_TINY.depth  # q, k and text-key norms of every block


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_forward_is_as_close_to_fp32_as_the_reference(dtype):
    """Measured (3 seeds, 3 configs): ours 0.85-1.2x the reference's distance from fp32 in bf16, 0.7-1.1x in fp16."""
    ours, ref = make_pair(FLUX_TINY, seed=6)
    latents, sigma, text, mask = inputs(FLUX_TINY)
    expected = ours(latents, sigma, ours.encode_text(text, mask))
    ours, ref = ours.to(dtype), ref.to(dtype)
    out = ours(latents.to(dtype), sigma, ours.encode_text(text.to(dtype), mask))
    ref_out = ref_forward(ref, latents.to(dtype), sigma, text.to(dtype), mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert max_rel_err(out.float(), expected) <= 1.5 * max_rel_err(ref_out.float(), expected)


def test_config_from_diffusers_round_trip_and_errors():
    ref_config = dict(reference(FLUX_TINY).config)
    assert TransformerConfig.from_diffusers(ref_config) == FLUX_TINY
    assert TransformerConfig.from_diffusers({"axes_dim": None}) == PRX_FLUX
    assert TransformerConfig(**asdict(PRX_DCAE)) == PRX_DCAE
    assert (PRX_DCAE.in_channels, PRX_DCAE.patch_size, PRX_FLUX.in_channels, PRX_FLUX.patch_size) == (32, 1, 16, 2)
    with pytest.raises(ValueError, match="unsupported"):
        TransformerConfig.from_diffusers({**ref_config, "qk_scale": 0.1})
    for bad in ({"num_heads": 5}, {"axes_dim": (32, 30)}, {"axes_dim": (31, 33)}, {"axes_dim": (64,)}, {"depth": 0}):
        with pytest.raises(ValueError):
            replace(PRX_FLUX, **bad)


@torch.no_grad()
def test_bad_inputs_raise():
    ours, _ = make_pair(FLUX_TINY)
    latents, sigma, text, mask = inputs(FLUX_TINY)
    context = ours.encode_text(text, mask)
    for bad in (latents[:, :, :-1], latents[..., :-1], latents[:, :-1]):  # height, width off the patch; channels
        with pytest.raises(ValueError, match="latents"):
            ours(bad, sigma, context)
    with pytest.raises(ValueError, match="sigma"):
        ours.modulate(sigma[0], *latents.shape[-2:])  # a 0-d noise level, not [N]
    with pytest.raises(ValueError, match="rows"):
        ours(latents[:2], sigma[:2], context)
    with pytest.raises(ValueError, match="text_mask"):
        ours.encode_text(text, mask[:, :5])
    with pytest.raises(ValueError, match="text_embeds"):
        ours.encode_text(text[..., :10], mask)


# ---- speedups that must not change the result -------------------------------------------------------------------


@torch.no_grad()
def test_complex_rope_equals_reference_rotation_at_full_size():
    """One complex product per tensor rotates exactly like the reference's real 2x2 form, at the published head
    split (axes 32 + 32) on a 512 px grid (32 x 32 patches)."""
    from diffusers.models.transformers.transformer_prx import PRXEmbedND, get_image_ids
    from diffusers.models.transformers.transformer_prx import apply_rope as ref_apply_rope

    from mirage.transformer import apply_rope

    h = w = 32
    x = torch.randn(2, 28, h * w, 64, generator=torch.Generator().manual_seed(0))
    ref_table = PRXEmbedND(dim=64, theta=10000, axes_dim=[32, 32])(get_image_ids(1, h, w, 1, torch.device("cpu")))
    ours = apply_rope(x, rope_table(h, w, (32, 32), 10000, torch.device("cpu")))
    assert_parity(ours, ref_apply_rope(x, ref_table), tol=1e-6)


@torch.no_grad()
def test_block_speedups_preserve_the_reference_block():
    """addcmul residuals and the in-place MLP product: one block against diffusers' PRXBlock, fp32, tight bound."""
    from diffusers.models.transformers.transformer_prx import PRXEmbedND, get_image_ids

    ours, ref = make_pair(FLUX_TINY, seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 24, 64, generator=g)
    txt = torch.randn(2, 5, 64, generator=g)
    vec = torch.randn(2, 64, generator=g)
    rope_ref = PRXEmbedND(dim=16, theta=10000, axes_dim=[8, 8])(get_image_ids(2, 6, 4, 1, torch.device("cpu")))
    expected = ref.blocks[0](x, txt, vec, rope_ref)
    block = ours.blocks[0]
    k, v = block.attention.text_kv(txt)
    mod = block.modulation(vec)  # [6, 2, 1, D]
    got = block(x, mod, k, v, rope_table(6, 4, (8, 8), 10000, torch.device("cpu")), None)
    assert_parity(got, expected, tol=2e-6)


@torch.no_grad()
def test_bf16_is_as_close_to_fp32_as_the_reference_bf16():
    """The observed bf16 bound: ours in bf16 stays as close to the fp32 result as diffusers in bf16 does."""
    ours, ref = make_pair(FLUX_TINY, seed=9)
    latents, sigma, text, mask = inputs(FLUX_TINY)
    truth = ref_forward(ref, latents, sigma, text, mask)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    ours_err = max_rel_err(ours(latents.bfloat16(), sigma, ours.encode_text(text.bfloat16(), mask)).float(), truth)
    ref_err = max_rel_err(ref_forward(ref, latents.bfloat16(), sigma, text.bfloat16(), mask).float(), truth)
    assert ours_err <= 1.25 * ref_err and ours_err < 0.03, (ours_err, ref_err)


@torch.no_grad()
def test_compiled_blocks_equal_eager():
    from mirage.pipeline import compile_model

    ours, _ = make_pair(FLUX_TINY, seed=10)
    latents, sigma, text, mask = inputs(FLUX_TINY)
    context = ours.encode_text(text, mask)
    eager = ours(latents, sigma, context)
    keys = list(ours.state_dict())
    assert compile_model(ours, "transformer") is ours
    assert list(ours.state_dict()) == keys  # names unchanged: loading and LoRA see the same model
    assert max_rel_err(ours(latents, sigma, context), eager) <= 1e-6


@torch.no_grad()
def test_in_place_temporaries_leave_inputs_untouched():
    """adaLN, the q/k norm weight and the MLP product run in place on temporaries only: the latents, the text
    context and the modulation stay as they were, and a step repeats exactly."""
    ours, _ = make_pair(EXTRAS_TINY, seed=11)
    latents, sigma, text, mask = inputs(EXTRAS_TINY)
    context = ours.encode_text(text, mask)
    mod = ours.modulate(sigma, *latents.shape[-2:])
    saved = [t.clone() for t in (latents, mod.blocks, mod.final, *context.keys, *context.values)]
    first = ours.forward_modulated(latents, mod, context)
    after = (latents, mod.blocks, mod.final, *context.keys, *context.values)
    assert all(torch.equal(a, b) for a, b in zip(after, saved))
    assert torch.equal(ours.forward_modulated(latents, mod, context), first)
