"""LoRA against the reference transformer with the same update written into its weights (W + scale * alpha / rank *
B @ A, every weight randomised): every key format, ranks 1/4/16, every kind of linear layer, fused and unfused;
scales, stacking, bit-exact unloading, bad files that change nothing, half precision, the pipeline methods and
`sample.py --lora` end to end."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import mirage.lora
import sample
from mirage.loading import read_safetensors
from mirage.lora import (
    PEFT_PREFIXES, LoRAError, add_lora, fuse_lora, load_lora, lora_names, set_lora_scale, unload_lora,
    with_config_alphas,
)  # fmt: skip
from mirage.pipeline import MiragePipeline
from parity import assert_parity, max_rel_err
from tests.test_transformer import EXTRAS_TINY, inputs, make_pair, ref_forward

REPO = Path(__file__).resolve().parent.parent
FORMATS = ("peft", "peft_prefixed", "trainer", "original", "kohya")
# The original training codebase's names of the attention layers, as ../shared/REFERENCE.md lists them.
ORIGINAL_NAMES = {
    ".attention.img_qkv_proj": ".img_qkv_proj",
    ".attention.txt_kv_proj": ".txt_kv_proj",
    ".attention.to_out.0": ".attn_out",
}


# ---- building LoRAs the way each format spells them --------------------------------------------------------------


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: m.weight.shape for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def random_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict:
    """layer -> (down [rank, in], up [out, rank], alpha): alpha is 0.5 or 1.5 x rank, or absent (None) every third
    layer. Sized so that each update is about as large as the weight it changes."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i, (layer, (out_features, in_features)) in enumerate(shapes.items()):
        down = torch.randn(rank, in_features, generator=g) / in_features**0.5
        up = torch.randn(out_features, rank, generator=g) / rank**0.5
        lora[layer] = (down, up, None if i % 3 == 0 else rank * (0.5, 1.5)[i % 2])
    return lora


def spell(layer: str, style: str) -> tuple[str, str, str]:
    """The keys of down, up and alpha of one layer in one format."""
    if style == "kohya":
        stem = "lora_unet_" + layer.replace(".", "_")
        return f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"
    if style == "original":
        for diffusers_name, original_name in ORIGINAL_NAMES.items():
            layer = layer.replace(diffusers_name, original_name)
    prefix = {"peft_prefixed": "transformer.", "trainer": "diffusion_model."}.get(style, "")
    return f"{prefix}{layer}.lora_A.weight", f"{prefix}{layer}.lora_B.weight", f"{prefix}{layer}.alpha"


def state_dict_of(lora: dict, style: str) -> dict[str, torch.Tensor]:
    state = {}
    for layer, (down, up, alpha) in lora.items():
        down_key, up_key, alpha_key = spell(layer, style)
        state[down_key], state[up_key] = down, up
        if alpha is not None:
            state[alpha_key] = torch.tensor(alpha)
    return state


def delta(lora: dict, layer: str, scale: float) -> torch.Tensor:
    """The reference's update of one weight, fp32: up @ down * scale * alpha / rank (alpha = rank when absent)."""
    down, up, alpha = lora[layer]
    rank = down.shape[0]
    return up @ down * (scale * (rank if alpha is None else alpha) / rank)


@torch.no_grad()
def apply_to_reference(ref: nn.Module, lora: dict, scale: float) -> None:
    for layer in lora:
        ref.get_submodule(layer).weight += delta(lora, layer, scale)


# ---- the transformer against the reference -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    """Ours and the reference (EXTRAS_TINY: bottleneck img_in and resolution embedder too), inputs, our output."""
    ours, ref = make_pair(EXTRAS_TINY, seed=7)
    x = inputs(EXTRAS_TINY)
    with torch.no_grad():
        return ours, ref, x, run(ours, x)


def run(model, x) -> torch.Tensor:
    latents, sigma, text, mask = x
    return model(latents.to(model.dtype), sigma, model.encode_text(text.to(model.dtype), mask))


def targets(model: nn.Module, *words: str) -> dict[str, tuple[int, int]]:
    """The linear layers whose path contains one of `words` (all of them with none)."""
    return {k: v for k, v in linear_shapes(model).items() if not words or any(w in k for w in words)}


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("style", FORMATS)
@torch.no_grad()
def test_parity_every_format_rank_and_mode(pair, tmp_path, style, rank, fused):
    ours, ref, x, base = copy.deepcopy(pair)
    # Every linear layer: image QKV, text KV, attention out, gate/up/down, modulation, final layer, embedders.
    lora = random_lora(targets(ours), rank, seed=rank)
    path = tmp_path / f"{style}.safetensors"
    save_file(state_dict_of(lora, style), path)
    assert load_lora(ours, path, scale=0.8) == style
    if fused:
        fuse_lora(ours)
    apply_to_reference(ref, lora, 0.8)
    expected = ref_forward(ref, *x)
    assert max_rel_err(expected, base) > 0.1  # the LoRA changes the output
    assert_parity(run(ours, x), expected)


@pytest.mark.parametrize(
    "where, config",
    [
        ("pipeline", {"r": 4, "lora_alpha": 12, "alpha_pattern": {"gate_proj": 2, "blocks.1.attention.img_qkv_proj": 32}}),
        ("model", {"r": 4, "lora_alpha": 6, "use_rslora": True}),
        ("peft", {"r": 4}),  # PEFT's default lora_alpha is 8, not the rank
    ],
)
@torch.no_grad()
def test_alphas_from_the_lora_config(pair, tmp_path, where, config):
    """diffusers writes PEFT's LoraConfig into the file's metadata (its settings prefixed "transformer." when a
    pipeline saved it), PEFT beside it in adapter_config.json; the alphas are PEFT's: the first alpha_pattern key
    matching the end of the layer name, else lora_alpha; scaling alpha / sqrt(rank) with use_rslora. (Checked here
    against PEFT 0.21.2 itself, which the tests do not install.)"""
    ours, ref, x, base = copy.deepcopy(pair)
    lora = random_lora(targets(ours, "img_qkv_proj", "gate_proj", "txt_kv_proj"), 4, seed=11)
    for layer, (down, up, _) in lora.items():
        pattern = next((a for k, a in config.get("alpha_pattern", {}).items() if layer.endswith(k)), None)
        alpha = pattern or config.get("lora_alpha", 8)
        lora[layer] = (down, up, alpha * 2 if config.get("use_rslora") else alpha)  # alpha / sqrt(4) = 2 alpha / 4
    state = state_dict_of({k: (down, up, None) for k, (down, up, _) in lora.items()}, "peft")
    if where == "peft":
        path = tmp_path / "adapter_model.safetensors"
        save_file({f"base_model.model.{k}": v for k, v in state.items()}, path)
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    else:
        settings = {f"transformer.{k}": v for k, v in config.items()} if where == "pipeline" else config
        path = tmp_path / "lora.safetensors"
        save_file(state, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(settings)})
    load_lora(ours, path, scale=0.7)
    apply_to_reference(ref, lora, 0.7)
    expected = ref_forward(ref, *x)
    assert max_rel_err(expected, base) > 0.1
    assert_parity(run(ours, x), expected)


def test_lora_configs_that_cannot_be_used(pair, tmp_path):
    ours, _, _, _ = copy.deepcopy(pair)
    lora = random_lora(targets(ours, "gate_proj"), 4, seed=13)
    state = state_dict_of({k: (down, up, None) for k, (down, up, _) in lora.items()}, "peft")
    path = tmp_path / "lora.safetensors"
    for settings, message in [
        ("{not json", "is not JSON"),
        ("null", "is not a LoRA config"),
        ("[1, 2]", "is not a LoRA config"),
        ('{"lora_alpha": null}', "an alpha must be a number, got None"),
        ('{"lora_alpha": "16"}', "an alpha must be a number, got '16'"),
        ('{"alpha_pattern": ["gate_proj"]}', "alpha_pattern must map layer names to alphas"),
        ('{"alpha_pattern": {"gate_proj(": 2}}', "alpha_pattern key 'gate_proj(' is not a regular expression"),
        ('{"use_dora": true}', "DoRA"),
    ]:
        save_file(state, path, metadata={"lora_adapter_metadata": settings})
        with pytest.raises(LoRAError) as err:
            load_lora(ours, path)
        assert message in str(err.value) and "lora_adapter_metadata" in str(err.value) and "\n" not in str(err.value)
    # A pipeline's LoRA whose metadata holds only the text encoder's settings: no config for the transformer,
    # whose alphas are then the ranks (not PEFT's default 8, which the text encoder's config would give).
    save_file(state, path, metadata={"lora_adapter_metadata": json.dumps({"text_encoder.r": 4, "text_encoder.lora_alpha": 4})})
    load_lora(ours, path, name="rank")
    # PEFT's adapter_config.json is adapter_model.safetensors' config, not that of any other file beside it.
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 16}))
    save_file(state, path)
    load_lora(ours, path, name="beside")
    assert {u.alpha for layer in ours.modules() if hasattr(layer, "loras") for u in layer.loras} == {4.0}
    assert lora_names(ours) == ["beside", "rank"]


def test_alpha_pattern_keys_are_peft_layer_names_and_the_first_match_wins(pair, tmp_path):
    """PEFT matches a key against the end of a layer's name at a dot ("qkv_proj" is not the name of img_qkv_proj),
    and takes the first key that matches (blocks.0.gate_proj: 3, not 5)."""
    ours, _, _, _ = copy.deepcopy(pair)
    lora = random_lora(targets(ours, "img_qkv_proj", "gate_proj"), 4, seed=14)
    path = tmp_path / "lora.safetensors"
    config = {"lora_alpha": 8, "alpha_pattern": {"qkv_proj": 2, "gate_proj": 3, r"blocks\.0\..*": 5}}
    save_file(state_dict_of({k: (down, up, None) for k, (down, up, _) in lora.items()}, "peft"), path,
              metadata={"lora_adapter_metadata": json.dumps(config)})  # fmt: skip
    load_lora(ours, path)
    alphas = {layer: ours.get_submodule(layer).loras[0].alpha for layer in lora}
    assert alphas == {layer: 3 if "gate_proj" in layer else 5 if layer.startswith("blocks.0.") else 8 for layer in lora}


def test_alpha_pattern_keys_match_the_layer_names_without_the_files_prefix():
    """PEFT matches alpha_pattern against the model's module names: "transformer.", "diffusion_model." and
    "base_model.model." are the file's, so a key that needs them matches no layer."""
    for prefix in PEFT_PREFIXES:
        state = {f"{prefix}blocks.0.gate_proj.lora_A.weight": torch.ones(4, 8)}
        config = {"lora_alpha": 8, "alpha_pattern": {re.escape(prefix) + r"blocks\..*": 2}}
        alphas = with_config_alphas(state, config)
        assert alphas[f"{prefix}blocks.0.gate_proj.alpha"].item() == 8, prefix


def test_a_files_own_alphas_win_over_its_lora_config(pair, tmp_path):
    """The LoraConfig gives the alphas of the layers whose file holds none; an `.alpha` tensor stays that layer's alpha.
    (diffusers refuses a file with both.)"""
    ours, _, _, _ = copy.deepcopy(pair)
    lora = random_lora(targets(ours, "img_qkv_proj", "gate_proj"), 4, seed=15)  # alphas 6 and 2, none every third
    path = tmp_path / "lora.safetensors"
    save_file(state_dict_of(lora, "peft"), path, metadata={"lora_adapter_metadata": json.dumps({"lora_alpha": 8})})
    load_lora(ours, path)
    alphas = {layer: ours.get_submodule(layer).loras[0].alpha for layer in lora}
    assert alphas == {layer: 8 if alpha is None else alpha for layer, (_, _, alpha) in lora.items()}
    assert len(set(alphas.values())) == 3


@torch.no_grad()
def test_scale_changes_without_reloading(pair):
    ours, ref, x, base = copy.deepcopy(pair)
    lora = random_lora(targets(ours), 4, seed=11)
    add_lora(ours, state_dict_of(lora, "peft"), scale=1.0, name="style")
    for scale, fuse in [(0.3, False), (-1.2, False), (0.5, True), (2.0, True)]:
        if fuse:
            fuse_lora(ours, "style")
        set_lora_scale(ours, "style", scale)
        scaled = copy.deepcopy(ref)
        apply_to_reference(scaled, lora, scale)
        assert_parity(run(ours, x), ref_forward(scaled, *x))
    set_lora_scale(ours, "style", 0.0)
    assert torch.equal(run(ours, x), base)


@pytest.mark.parametrize("fuse", [(), ("a",), ("b",), ("a", "b")], ids=["unfused", "a-fused", "b-fused", "fused"])
@torch.no_grad()
def test_two_stacked_loras(pair, fuse):
    ours, ref, x, base = copy.deepcopy(pair)
    # Overlapping targets (the attention projections), different formats, ranks and scales.
    lora_a = random_lora(targets(ours, "attention", "_in", "embedder"), 4, seed=1)
    lora_b = random_lora(targets(ours, "proj", "modulation", "final_layer"), 16, seed=2)
    add_lora(ours, state_dict_of(lora_a, "kohya"), 0.7, name="a")
    add_lora(ours, state_dict_of(lora_b, "trainer"), -0.4, name="b")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for name in fuse:
        fuse_lora(ours, name)
    assert lora_names(ours) == ["a", "b"]
    fused_layers = {layer for name in fuse for layer in {"a": lora_a, "b": lora_b}[name]}
    for layer in targets(ours):  # fusing one LoRA leaves the layers only the other one changes as they were
        assert torch.equal(ours.get_submodule(layer).weight, before[f"{layer}.weight"]) == (layer not in fused_layers)
    apply_to_reference(ref, lora_a, 0.7)
    apply_to_reference(ref, lora_b, -0.4)
    assert_parity(run(ours, x), ref_forward(ref, *x))
    unload_lora(ours)  # both at once, from the layers both change too
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    assert lora_names(ours) == [] and torch.equal(run(ours, x), base)


@torch.no_grad()
def test_unload_restores_every_bit(pair):
    ours, _, x, base = copy.deepcopy(pair)
    only_b = copy.deepcopy(ours)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    lora_a = random_lora(targets(ours), 4, seed=3)
    lora_b = random_lora(targets(ours, "blocks.1"), 1, seed=4)
    add_lora(ours, state_dict_of(lora_a, "original"), 0.9, name="a")
    add_lora(ours, state_dict_of(lora_b, "peft"), 1.3, name="b")
    fuse_lora(ours)
    set_lora_scale(ours, "a", 0.2)
    assert list(ours.state_dict()) == list(before)  # LoRA tensors never enter the state dict
    assert not torch.equal(ours.txt_in.weight, before["txt_in.weight"])

    # With "a" gone, the weights are exactly those of "b" fused alone.
    unload_lora(ours, "a")
    add_lora(only_b, state_dict_of(lora_b, "peft"), 1.3, name="b")
    fuse_lora(only_b)
    assert all(torch.equal(v, only_b.state_dict()[k]) for k, v in ours.state_dict().items())

    unload_lora(ours)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    assert torch.equal(run(ours, x), base)
    assert lora_names(ours) == [] and not any("lora" in name for name, _ in ours.named_modules())
    assert all(type(m) is nn.Linear for m in ours.modules() if isinstance(m, nn.Linear))  # plain layers again


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_merges_in_fp32(pair, dtype):
    ours, ref, x, _ = copy.deepcopy(pair)
    ours = ours.to(dtype)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    lora = random_lora(targets(ours), 4, seed=5)
    add_lora(ours, state_dict_of(lora, "kohya"), 0.8, name="half")
    assert all(b.dtype == dtype for name, b in ours.named_buffers() if "lora" in name)
    unfused = run(ours, x)
    fuse_lora(ours)
    fused = run(ours, x)
    apply_to_reference(ref, lora, 0.8)
    expected = ref_forward(ref, *x)
    for out in (unfused, fused):
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert max_rel_err(out.float(), expected) < 0.05
    layer = "blocks.0.attention.img_qkv_proj"
    down, up, alpha = lora[layer]
    half_lora = {layer: (down.to(dtype).float(), up.to(dtype).float(), alpha)}
    merged = (before[f"{layer}.weight"].float() + delta(half_lora, layer, 0.8)).to(dtype)  # fp32 sum, one cast
    assert torch.equal(ours.get_submodule(layer).weight, merged)
    unload_lora(ours)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_unfused_half_precision_is_pefts_layer_bit_for_bit(pair, dtype):
    """Unfused, a layer computes what PEFT's LoRA Linear computes once diffusers' `inject_adapter_in_model` has made
    it (adapter weights in the layer's dtype; checked against PEFT 0.21.2 itself, which the tests do not install):
    base(x) + lora_B(lora_A(x)) * scaling, one LoRA after the other in load order, each step rounded to the dtype.
    Half-precision rounding tells any other order apart: the scale applied first or between the two products, the
    update in fp32, the updates summed before the output, the LoRAs in the other order."""
    ours, _, _, _ = copy.deepcopy(pair)
    ours = ours.to(dtype)
    layers = targets(ours, "img_qkv_proj", "gate_proj", "txt_in")
    loras = [(random_lora(layers, 4, seed=18), 0.8, "kohya"), (random_lora(layers, 16, seed=19), -0.6, "peft")]
    for i, (lora, scale, style) in enumerate(loras):
        add_lora(ours, state_dict_of(lora, style), scale, name=f"lora{i}")
    gen = torch.Generator().manual_seed(18)
    for layer in layers:
        linear = ours.get_submodule(layer)
        x = torch.randn(2, 16, linear.in_features, generator=gen).to(dtype)
        expected = F.linear(x, linear.weight, linear.bias)  # PEFT's base layer
        for lora, scale, _ in loras:
            down, up, alpha = lora[layer]
            scaling = scale * (down.shape[0] if alpha is None else alpha) / down.shape[0]  # PEFT's set_scale
            expected = expected + F.linear(F.linear(x, down.to(dtype)), up.to(dtype)) * scaling
        assert torch.equal(linear(x), expected), layer


@torch.no_grad()
def test_unloading_after_a_dtype_change_keeps_the_models_dtype(pair):
    ours, _, x, _ = copy.deepcopy(pair)
    add_lora(ours, state_dict_of(random_lora(targets(ours, "blocks.0"), 4, seed=12), "peft"), 0.5, name="style")
    fuse_lora(ours)
    ours.to(torch.bfloat16)
    unload_lora(ours)  # the kept original weights are fp32: they come back in the model's dtype
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert torch.isfinite(run(ours, x)).all()


@torch.no_grad()
def test_a_lora_fused_after_another_was_unloaded_starts_from_the_current_weights(pair):
    """Once nothing on a layer is fused, its weight is the model's own again: a LoRA fused later (here after a dtype
    change) merges into the weight as it is then, as if the unloaded LoRA had never been loaded."""
    ours, _, _, _ = copy.deepcopy(pair)
    only_b = copy.deepcopy(ours)
    lora_a, lora_b = (random_lora(targets(ours, "blocks.0"), 4, seed=seed) for seed in (16, 17))
    add_lora(ours, state_dict_of(lora_a, "peft"), 0.9, name="a")
    add_lora(ours, state_dict_of(lora_b, "peft"), 0.6, name="b")
    fuse_lora(ours, "a")
    unload_lora(ours, "a")  # "b" stays, unfused
    add_lora(only_b, state_dict_of(lora_b, "peft"), 0.6, name="b")
    for model in (ours, only_b):
        model.to(torch.bfloat16)
        fuse_lora(model, "b")
    assert all(torch.equal(v, only_b.state_dict()[k]) for k, v in ours.state_dict().items())


def test_lora_tensors_follow_the_model():
    ours, _ = make_pair(EXTRAS_TINY)
    add_lora(ours, state_dict_of(random_lora(targets(ours), 4, seed=6), "peft"), 1.0, name="moving")
    ours.to(torch.float64)  # what .to(device) does to them too, as offloading moves the model
    assert all(b.dtype == torch.float64 for name, b in ours.named_buffers() if "lora" in name)


@torch.no_grad()
def test_blocks_compiled_before_the_lora_see_it(pair):
    ours, ref, x, base = copy.deepcopy(pair)
    ours.blocks[1].compile(backend="eager")  # what torch.compile traces and guards is the point, not codegen
    assert torch.equal(run(ours, x), base)
    lora = random_lora(targets(ours, "blocks.1"), 4, seed=12)
    add_lora(ours, state_dict_of(lora, "peft"), 0.6, name="late")
    apply_to_reference(ref, lora, 0.6)
    assert_parity(run(ours, x), ref_forward(ref, *x))
    unload_lora(ours)
    assert torch.equal(run(ours, x), base)


# ---- bad input -----------------------------------------------------------------------------------------------------

Q = "blocks.0.attention.img_qkv_proj"
KOHYA_TE = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"  # kohya's text-encoder spelling


def bad_inputs(good: dict[str, torch.Tensor]):
    """(id, bad state dict, the key the error must name)."""
    a, b, alpha = good[f"{Q}.lora_A.weight"], good[f"{Q}.lora_B.weight"], f"{Q}.alpha"
    without_b = {k: v for k, v in good.items() if k != f"{Q}.lora_B.weight"}
    return [
        ("unknown-part", {**good, f"{Q}.lora_C.weight": a}, f"{Q}.lora_C.weight"),
        ("unknown-format", {**good, "blocks.0.gate_proj.hada_w1": a}, "blocks.0.gate_proj.hada_w1"),
        ("mixed-formats", {**good, "lora_unet_blocks_0_gate_proj.lora_down.weight": a}, "lora_unet_blocks_0_gate_proj"),
        ("missing-layer", {**good, "blocks.2.gate_proj.lora_A.weight": a}, "blocks.2.gate_proj.lora_A.weight"),
        ("not-linear", {**good, "blocks.0.attention.norm_q.lora_A.weight": a}, "blocks.0.attention.norm_q.lora_A"),
        ("kohya-unknown", {"lora_unet_blocks_0_attention_qkv.lora_down.weight": a}, "lora_unet_blocks_0_attention_qkv"),
        ("missing-up", without_b, f"{Q}.lora_A.weight"),
        ("rank", {**good, f"{Q}.lora_B.weight": b[:, :3]}, f"{Q}.lora_B.weight"),
        ("rank-0", {**good, f"{Q}.lora_A.weight": a[:0], f"{Q}.lora_B.weight": b[:, :0]}, f"{Q}.lora_A.weight"),
        ("in-features", {**good, f"{Q}.lora_A.weight": a[:, :-1]}, f"{Q}.lora_A.weight"),
        ("out-features", {**good, f"{Q}.lora_B.weight": b[:-1]}, f"{Q}.lora_B.weight"),
        ("not-a-matrix", {**good, f"{Q}.lora_A.weight": a[None]}, f"{Q}.lora_A.weight"),
        ("alpha-shape", {**good, alpha: torch.ones(2)}, alpha),
        ("alpha-inf", {**good, alpha: torch.tensor(float("inf"))}, alpha),
        ("nan", {**good, f"{Q}.lora_B.weight": torch.full_like(b, float("nan"))}, f"{Q}.lora_B.weight"),
        ("integer", {**good, f"{Q}.lora_A.weight": a.int()}, f"{Q}.lora_A.weight"),
        ("fp8", {**good, f"{Q}.lora_A.weight": a.to(torch.float8_e4m3fn)}, f"{Q}.lora_A.weight"),
        ("text-encoder", {**good, "text_encoder.layers.0.q_proj.lora_A.weight": a}, "A.weight is for a text encoder"),
        ("kohya-text-encoder", {**good, f"{KOHYA_TE}.lora_down.weight": a}, f"{KOHYA_TE}.lora_down.weight is for a"),
        ("two-spellings", {**good, "blocks.0.img_qkv_proj.lora_A.weight": a}, "blocks.0.img_qkv_proj.lora_A.weight"),
        ("empty", {}, "no tensors"),
    ]


@torch.no_grad()
def test_bad_input_raises_one_line_naming_the_key_and_changes_nothing(pair):
    ours, _, x, _ = copy.deepcopy(pair)
    add_lora(ours, state_dict_of(random_lora(targets(ours, "blocks.1"), 4, seed=8), "peft"), 0.5, name="fused")
    fuse_lora(ours)
    add_lora(ours, state_dict_of(random_lora(targets(ours, "_in"), 4, seed=9), "peft"), 0.5, name="unfused")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    base = run(ours, x)
    good = state_dict_of(random_lora(targets(ours, Q, "gate_proj"), 4, seed=10), "peft")
    cases = bad_inputs(good)
    assert len({case[0] for case in cases}) == len(cases)
    for case, state, key in cases:
        with pytest.raises(LoRAError) as err:
            add_lora(ours, state, 1.0, name=case)
        assert key in str(err.value) and "\n" not in str(err.value), case
    for bad_call, words in [
        (lambda: add_lora(ours, good, 1.0, name="fused"), "already loaded"),
        (lambda: add_lora(ours, good, float("nan"), name="nan"), "finite"),
        (lambda: set_lora_scale(ours, "fused", float("inf")), "finite"),
        (lambda: set_lora_scale(ours, "nothing", 1.0), "nothing"),
        (lambda: fuse_lora(ours, "nothing"), "nothing"),
        (lambda: unload_lora(ours, "nothing"), "nothing"),
    ]:
        with pytest.raises(LoRAError, match=words):
            bad_call()
    assert lora_names(ours) == ["fused", "unfused"]  # sorted
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    assert torch.equal(run(ours, x), base)


@pytest.mark.parametrize(
    "te_prefix", ["lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2."]
)
@pytest.mark.parametrize("style", ["kohya", "peft"])
def test_every_text_encoder_spelling_is_refused_as_such(pair, te_prefix, style):
    """A whole pipeline's LoRA: kohya names its text encoders lora_te_ (one), lora_te1_ / lora_te2_ (SDXL's two),
    lora_te3_ (SD3's T5), diffusers text_encoder. and text_encoder_2.; whatever the transformer's keys look like, the
    error says the file is for a text encoder and names its first such key, not a puzzling "unknown key"."""
    ours, _, _, _ = copy.deepcopy(pair)
    state = state_dict_of(random_lora(targets(ours, "gate_proj"), 4, seed=20), style)
    diffusers = te_prefix.endswith(".")  # else kohya: the layer path with its dots written as underscores
    sep, parts = (".", ("lora_A.weight", "lora_B.weight")) if diffusers else ("_", ("lora_down.weight", "alpha"))
    te_keys = [f"{te_prefix}text_model{sep}encoder{sep}layers{sep}{i}{sep}self_attn{sep}q_proj.{part}"
               for i in (1, 0) for part in parts]  # fmt: skip
    with pytest.raises(LoRAError) as err:
        add_lora(ours, {**state, **{k: torch.ones(4, 8) for k in te_keys}}, 1.0, name="pipeline")
    assert f"{min(te_keys)} is for a text encoder" in str(err.value)
    assert lora_names(ours) == []


def test_bad_files(tmp_path):
    ours, _ = make_pair(EXTRAS_TINY)
    with pytest.raises(LoRAError, match="does not exist"):
        load_lora(ours, tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not safetensors")
    with pytest.raises(LoRAError, match="garbage.safetensors is not a readable safetensors file"):
        load_lora(ours, garbage)
    assert lora_names(ours) == []


def lora_state(model: nn.Module) -> tuple[dict, list]:
    """Everything a LoRA change may touch: the weights, and each linear layer's class, LoRAs, fusing and scales."""
    layers = [(name, type(m), [(u.name, u.fused, u.scale) for u in getattr(m, "loras", [])],
               getattr(m, "original", None) is not None)
              for name, m in model.named_modules() if isinstance(m, nn.Linear)]  # fmt: skip
    return {k: v.clone() for k, v in model.state_dict().items()}, layers


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")


def third_call_fails(real):
    """`real`, except that its third call runs out of memory: a change stopped after two layers."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(None)
        return out_of_memory() if len(calls) == 3 else real(*args, **kwargs)

    return wrapped


def with_a_fused_lora(pair) -> tuple[nn.Module, torch.Tensor]:
    ours, _, x, _ = copy.deepcopy(pair)
    add_lora(ours, state_dict_of(random_lora(targets(ours, "blocks"), 4, seed=13), "peft"), 0.5, name="fused")
    fuse_lora(ours)
    return ours, x


def assert_as_before(model: nn.Module, before: tuple[dict, list], x: torch.Tensor, base: torch.Tensor) -> None:
    after = lora_state(model)
    assert after[1] == before[1]
    assert all(torch.equal(v, before[0][k]) for k, v in after[0].items())
    assert torch.equal(run(model, x), base)


CHANGES = {  # each stopped at its third layer: in LoRALinear.merge, or where add_lora builds an update
    "add": ("LoRAUpdate.__init__",
            lambda m: add_lora(m, state_dict_of(random_lora(targets(m), 2, seed=12), "kohya"), 0.7, "late")),
    "fuse one": ("LoRALinear.merge", lambda model: fuse_lora(model, "unfused")),
    "fuse all": ("LoRALinear.merge", lambda model: fuse_lora(model)),
    "scale": ("LoRALinear.merge", lambda model: set_lora_scale(model, "fused", 0.3)),
    "unload one": ("LoRALinear.merge", lambda model: unload_lora(model, "fused")),
    "unload all": ("LoRALinear.merge", lambda model: unload_lora(model)),
}


@pytest.mark.parametrize("change", CHANGES)
@torch.no_grad()
def test_a_change_stopped_partway_leaves_the_model_as_it_was(pair, monkeypatch, change):
    """An out-of-memory error (merging on the GPU) or Ctrl-C after some layers changed: every layer, weight, fusing
    and scale is as before, and the same change made again gives what it gives on a model never stopped."""
    ours, x = with_a_fused_lora(pair)
    add_lora(ours, state_dict_of(random_lora(targets(ours, "blocks.1", "final"), 4, seed=14), "peft"), 0.8,
             name="unfused")  # fmt: skip
    untouched = copy.deepcopy(ours)
    before, base = lora_state(ours), run(ours, x)
    where, make = CHANGES[change]
    owner, method = where.split(".", 1)
    cls = getattr(mirage.lora, owner)
    monkeypatch.setattr(cls, method, third_call_fails(getattr(cls, method)))
    with pytest.raises(torch.OutOfMemoryError):
        make(ours)
    monkeypatch.undo()
    assert_as_before(ours, before, x, base)
    make(ours)  # again, to the end this time
    make(untouched)
    assert lora_state(ours)[1] == lora_state(untouched)[1]
    assert all(torch.equal(v, untouched.state_dict()[k]) for k, v in ours.state_dict().items())


@torch.no_grad()
def test_a_load_stopped_by_running_out_of_memory_is_undone_without_merging(pair, monkeypatch):
    """A load out of memory at its third layer, with memory still short: undoing it needs no merge (the weights did
    not change), so the fused weights it touched are left alone and the model is as it was, not half-loaded."""
    ours, x = with_a_fused_lora(pair)
    before, base = lora_state(ours), run(ours, x)
    monkeypatch.setattr(mirage.lora.LoRAUpdate, "__init__", third_call_fails(mirage.lora.LoRAUpdate.__init__))
    monkeypatch.setattr(mirage.lora.LoRALinear, "merge", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        add_lora(ours, state_dict_of(random_lora(targets(ours), 2, seed=12), "kohya"), 0.7, "late")
    monkeypatch.undo()
    assert lora_names(ours) == ["fused"]
    assert_as_before(ours, before, x, base)


# ---- the pipeline and sample.py ------------------------------------------------------------------------------------


def transformer_lora(folder: Path, rank: int = 4, seed: int = 0) -> dict:
    """A random LoRA on the attention, MLP and final layers of a converted checkpoint's transformer."""
    weights = read_safetensors(folder / "transformer.safetensors")
    shapes = {k.removesuffix(".weight"): v.shape for k, v in weights.items() if k.endswith(".weight") and v.ndim == 2}
    return random_lora({k: v for k, v in shapes.items() if "proj" in k or "to_out" in k or "final" in k}, rank, seed)


@torch.no_grad()
def test_pipeline_methods(mirage_flux, tmp_path):
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu")
    path = tmp_path / "detail.safetensors"
    save_file(state_dict_of(transformer_lora(mirage_flux), "kohya"), path)

    def latents():
        return pipe(
            "a red fox", seed=1, num_inference_steps=2, height=64, width=64, use_resolution_binning=False,
            output_type="latent", progress=False,
        )  # fmt: skip

    base = latents()
    assert pipe.load_lora(path, scale=0.6) == "detail"
    unfused = latents()
    pipe.fuse_lora()
    assert max_rel_err(unfused, base) > 0.05
    assert_parity(latents(), unfused, tol=1e-4)

    def change_lora(step, *_):
        pipe.set_lora_scale("detail", 0.1)

    with pytest.raises(LoRAError, match="cannot change during denoising"):  # the text side would keep the old one
        pipe("a red fox", num_inference_steps=2, height=64, width=64, output_type="latent", callback=change_lora)
    pipe.set_lora_scale("detail", 0.0)  # merged again from the original weights: W + 0 is W
    assert torch.equal(latents(), base)
    pipe.unload_lora()
    assert torch.equal(latents(), base)
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_blocks_0_gate.lora_down.weight": torch.ones(1, 1)}, bad)
    with pytest.raises(LoRAError, match="lora_unet_blocks_0_gate"):
        pipe.load_lora(bad)
    assert torch.equal(latents(), base)


@torch.no_grad()
def test_a_lora_loaded_first_waits_for_the_transformer(mirage_flux, tmp_path):
    """Loading a LoRA does not read the transformer (it would sit beside the text encoder): the file is checked
    on a weightless copy and attached when the transformer is read, with the same result."""
    path = tmp_path / "detail.safetensors"
    save_file(state_dict_of(transformer_lora(mirage_flux), "peft"), path)
    kwargs = dict(seed=1, num_inference_steps=2, height=64, width=64, use_resolution_binning=False,
                  output_type="latent", progress=False)  # fmt: skip
    early = MiragePipeline.from_pretrained(mirage_flux, device="cpu")
    assert early.load_lora(path, scale=0.6) == "detail" and "transformer" not in early.models
    with pytest.raises(LoRAError, match="already loaded"):  # checked now, names included
        early.load_lora(path)
    bad = tmp_path / "bad.safetensors"
    save_file({"blocks.0.attention.nope.lora_A.weight": torch.ones(1, 1)}, bad)
    with pytest.raises(LoRAError, match="blocks.0.attention.nope"):
        early.load_lora(bad)
    assert "transformer" not in early.models
    late = MiragePipeline.from_pretrained(mirage_flux, device="cpu")
    late.transformer
    late.load_lora(path, scale=0.6)
    assert torch.equal(early("a red fox", **kwargs), late("a red fox", **kwargs))
    assert lora_names(early.transformer) == ["detail"] and early.pending_loras == []


def test_sample_py_lora_equals_the_fused_checkpoint(mirage_flux, tmp_path):
    lora = transformer_lora(mirage_flux, seed=1)
    lora_path = tmp_path / "style.safetensors"
    save_file(state_dict_of(lora, "trainer"), lora_path)
    fused = tmp_path / "fused"
    shutil.copytree(mirage_flux, fused)
    weights = read_safetensors(mirage_flux / "transformer.safetensors")
    for layer in lora:
        weights[f"{layer}.weight"] = weights[f"{layer}.weight"] + delta(lora, layer, 0.8)
    save_file(weights, fused / "transformer.safetensors")

    common = ["--prompt", "a red fox", "--steps", "2", "--seed", "3", "--height", "64", "--width", "64", "--no-binning"]
    runs = {
        "plain": ["--weights", str(mirage_flux)],
        "lora": ["--weights", str(mirage_flux), "--lora", f"{lora_path}:0.8"],
        "fused": ["--weights", str(fused)],
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, "sample.py", *common, *args, "--output", str(tmp_path / f"{name}.png")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # three runs at once share the cores
        )
        for name, args in runs.items()
    }  # fmt: skip
    results = {name: p.communicate(timeout=120) + (p.returncode,) for name, p in processes.items()}
    for name, (_, stderr, code) in results.items():
        assert code == 0, stderr
    images = {name: np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16) for name in runs}
    assert np.abs(images["lora"] - images["plain"]).mean() > 2
    assert np.abs(images["lora"] - images["fused"]).max() <= 1  # fused and unfused differ only in fp32 rounding
    settings = json.loads(Image.open(tmp_path / "lora.png").text["mirage"])
    assert settings["lora"] == [{"path": str(lora_path.resolve()), "scale": 0.8}]


def test_sample_py_rejects_a_bad_lora_before_sampling(mirage_flux, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.blocks.0.attention.nope.lora_A.weight": torch.ones(1, 1)}, bad)
    args = ["--weights", str(mirage_flux), "--prompt", "a red fox", "--output", str(tmp_path / "out.png")]
    with pytest.raises(LoRAError, match="diffusion_model.blocks.0.attention.nope.lora_A.weight") as err:
        sample.main([*args, "--lora", f"{bad}:0.5"])
    assert "\n" not in str(err.value) and not (tmp_path / "out.png").exists()
    for spec in (f"{tmp_path / 'missing.safetensors'}:0.5", f"{bad}:nan"):
        with pytest.raises(ValueError, match="--lora"):
            sample.main([*args, "--lora", spec])
    with pytest.raises(ValueError, match="is given twice"):  # however it is written
        sample.main([*args, "--lora", f"{bad}:0.5", "--lora", f"{bad.parent}/../{bad.parent.name}/{bad.name}:0.3"])
    assert sample.lora_spec("C:/loras/x.safetensors") == (Path("C:/loras/x.safetensors"), 1.0)
    assert sample.lora_spec("x.safetensors:-0.5") == (Path("x.safetensors"), -0.5)


def test_a_prompts_file_rerun_with_a_lora_is_refused(mirage_flux, tmp_path):
    """A resumed --prompts-file run keeps the images there: they must have been made with its LoRAs."""
    lora_path = tmp_path / "style.safetensors"
    save_file(state_dict_of(transformer_lora(mirage_flux), "trainer"), lora_path)
    (tmp_path / "p.txt").write_text("a fox\n", encoding="utf-8")
    run = ["--weights", str(mirage_flux), "--prompts-file", str(tmp_path / "p.txt"), "--outdir", str(tmp_path / "out"),
           "--steps", "1", "--height", "64", "--width", "64", "--no-binning", "--device", "cpu"]  # fmt: skip
    sample.main(run)
    with pytest.raises(ValueError, match="00000-a-fox.png was made with lora"):
        sample.main([*run, "--lora", f"{lora_path}:0.5"])
