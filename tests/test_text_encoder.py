"""The T5Gemma encoder against transformers' `T5GemmaEncoder`, and its config against transformers' config classes."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parity import assert_norms_match, assert_parity, max_rel_err, randomize_
from transformers.models.t5gemma.configuration_t5gemma import T5GemmaConfig, T5GemmaModuleConfig
from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder as RefEncoder
from transformers.models.t5gemma.modeling_t5gemma import T5GemmaRotaryEmbedding as RefRotaryEmbedding

from mirage.configs import FULL_ATTENTION, SLIDING_ATTENTION, TextEncoderConfig
from mirage.text_encoder import T5GemmaEncoder

S, F = SLIDING_ATTENTION, FULL_ATTENTION

# Small, but every knob off its default so a field read from the wrong key shows: head_dim != hidden / heads,
# query_pre_attn_scalar != head_dim, a soft-cap small enough to bend the scores, a window (3) smaller than
# the sequences, and a layer pattern that is not the default alternation.
TINY = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    query_pre_attn_scalar=10,
    attn_logit_softcapping=2.0,
    sliding_window=3,
    layer_types=[F, S, S, F],
)


def reference_config(**encoder) -> T5GemmaConfig:
    """A composite config as google/t5gemma-* checkpoints have (T5GemmaEncoder needs its encoder half)."""
    return T5GemmaConfig(encoder=encoder, decoder=encoder)


def legacy(d: dict) -> dict:
    """A transformers 4.x style module dict: `rope_theta` where 5.x writes `rope_parameters`."""
    d = dict(d)
    d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
    return d


def random_prompts(lengths: list[int], vocab: int = 101, seed: int = 0) -> list[torch.Tensor]:
    """Token ids of one prompt per length, never the pad id 0."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen) for n in lengths]


def pad(prompts: list[torch.Tensor], width: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, width] and bool mask, padded with 0 on `side` ("left" as Gemma tokenizers do, or "right")."""
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        cols = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, cols], mask[row, cols] = prompt, True
    return ids, mask


def build_strict(config: TextEncoderConfig, state_dict: dict) -> T5GemmaEncoder:
    """Ours as checkpoints load it: built on the meta device, then given the tensors (strict, assign=True)."""
    with torch.device("meta"):
        model = T5GemmaEncoder(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def tiny_pair(seed: int = 0) -> tuple[RefEncoder, T5GemmaEncoder]:
    ref = RefEncoder(reference_config(**TINY).encoder).eval()
    randomize_(ref, seed)
    weights = {k: v.clone() for k, v in ref.state_dict().items()}
    ours = build_strict(TextEncoderConfig.from_transformers(ref.config.to_dict()), weights)
    return ref, ours


# ---- config ---------------------------------------------------------------------------------


def test_defaults_are_the_2b_encoder():
    composite = T5GemmaConfig()  # transformers' defaults are the 2B-2B model
    assert TextEncoderConfig() == TextEncoderConfig.from_transformers(composite.to_dict())
    assert TextEncoderConfig() == TextEncoderConfig.from_transformers(composite.encoder.to_dict())
    c = TextEncoderConfig()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (256000, 2304, 9216, 26)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (8, 4, 256)
    assert (c.rope_theta, c.query_pre_attn_scalar, c.attn_logit_softcapping, c.sliding_window) == (10000.0, 256, 50.0, 4096)
    assert c.rms_norm_eps == 1e-6 and c.layer_types == (S, F) * 13


@pytest.mark.parametrize("shape", ["composite", "flat", "composite 4.x", "flat 4.x"])
def test_from_transformers_reads_every_config_shape(shape):
    composite = reference_config(**TINY).to_dict()
    if shape.endswith("4.x"):
        composite["encoder"] = legacy(composite["encoder"])
        composite["decoder"] = legacy(composite["decoder"])
        # transformers 5.x itself still reads such a file, and to the same theta
        assert T5GemmaConfig.from_dict(composite).encoder.rope_parameters["rope_theta"] == 500.0
    d = composite if shape.startswith("composite") else composite["encoder"]
    d = json.loads(json.dumps(d))  # as read from config.json: lists, no tuples
    config = TextEncoderConfig.from_transformers(d)
    expected = {k: v for k, v in TINY.items() if k != "rope_parameters"}
    assert config == TextEncoderConfig(**expected, rope_theta=500.0)


def test_missing_layer_types_alternate_from_sliding():
    d = T5GemmaModuleConfig(num_hidden_layers=3).to_dict()
    del d["layer_types"]
    assert TextEncoderConfig.from_transformers(d).layer_types == (S, F, S)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gemma2"}, "model_type"),
        ({"is_decoder": True}, "decoder"),
        ({"hidden_activation": "gelu"}, "hidden_activation"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ],
)
def test_from_transformers_rejects_what_it_does_not_build(change, message):
    d = {**T5GemmaConfig().encoder.to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        TextEncoderConfig.from_transformers(d)


@pytest.mark.parametrize(
    "change",
    [
        {"num_key_value_heads": 3},
        {"head_dim": 255},
        {"layer_types": (S, F)},
        {"layer_types": ("sliding_attention", "causal_attention") * 13},
        {"sliding_window": None},
        {"attn_logit_softcapping": 0.0},
        {"hidden_size": 0},
    ],
)
def test_impossible_configs_raise(change):
    with pytest.raises(ValueError):
        dataclasses.replace(TextEncoderConfig(), **change)


def test_config_round_trips_through_asdict():
    config = TextEncoderConfig.from_transformers(reference_config(**TINY).to_dict())
    assert TextEncoderConfig(**dataclasses.asdict(config)) == config
    assert TextEncoderConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config  # lists back to tuples


# ---- structure ------------------------------------------------------------------------------


def test_full_preset_has_the_reference_keys_shapes_and_size():
    with torch.device("meta"):
        ours = T5GemmaEncoder()
        ref = RefEncoder(T5GemmaConfig().encoder)
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 2_614_341_888
    assert not list(ours.buffers())  # nothing a meta-device build could leave behind


def test_the_embedding_table_is_drawn_except_on_the_meta_device(monkeypatch):
    from mirage.text_encoder import Embedding

    torch.manual_seed(0)
    ours = Embedding(50, 8, padding_idx=0)
    torch.manual_seed(0)
    assert torch.equal(ours.weight, torch.nn.Embedding(50, 8, padding_idx=0).weight)  # built on the CPU: as torch draws
    monkeypatch.setattr(torch.nn.init, "normal_", lambda *args, **kwargs: pytest.fail("drew values on the meta device"))
    with torch.device("meta"):
        assert Embedding(50, 8).weight.is_meta


def test_forward_rejects_a_non_bool_or_misshaped_mask():
    _, ours = tiny_pair()
    ids, mask = pad(random_prompts([4]), 4, "right")
    for bad in (mask.long(), mask[:, :3], mask.expand(2, 4)):  # not bool; shorter or more rows than the ids
        with pytest.raises(ValueError, match="bool tensor shaped like input_ids"):
            ours(ids, bad)


# ---- parity ---------------------------------------------------------------------------------


def test_parity_with_padding_on_either_side():
    ref, ours = tiny_pair()
    assert ref.config._attn_implementation == "eager"  # the reference's soft-capping path
    left_ids, left_mask = pad(random_prompts([12, 7, 2], seed=1), 12, "left")
    right_ids, right_mask = pad(random_prompts([12, 9, 1], seed=2), 12, "right")
    ids, mask = torch.cat([left_ids, right_ids]), torch.cat([left_mask, right_mask])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert_parity(got[mask], expected[mask], tol=2e-5)  # every token; padding is never computed, and left zero
    assert not got[~mask].any()


def test_norms_match_reference_where_eps_matters():
    ref, ours = tiny_pair(seed=4)
    assert assert_norms_match(ours, ref) == 4 * ours.config.num_hidden_layers + 1  # 4 per layer, and the final norm


def test_norms_round_as_the_reference_in_bf16():
    """Gemma's norm scales by (1 + w) in fp32 and casts back last (Llama's casts first, then scales): only half
    precision shows the order, and the whole-model bf16 test below measures both sides against fp32."""
    ref, ours = tiny_pair(seed=5)
    ref_layers = dict(ref.named_modules())
    norms = [(name, m) for name, m in ours.named_modules() if "Norm" in type(m).__name__]
    gen = torch.Generator().manual_seed(0)
    for name, norm in norms:
        ref_norm = copy.deepcopy(ref_layers[name]).bfloat16()
        x = (torch.randn(2, 5, norm.weight.shape[0], generator=gen) * 3).bfloat16()
        assert torch.equal(copy.deepcopy(norm).bfloat16()(x), ref_norm(x)), name
    assert len(norms) == 4 * ours.config.num_hidden_layers + 1


def test_bf16_is_as_accurate_as_the_reference_bf16():
    ref, ours = tiny_pair(seed=3)
    ids, mask = pad(random_prompts([12, 5], seed=4), 12, "left")
    with torch.no_grad():
        exact = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_err = max_rel_err(ref.bfloat16()(input_ids=ids, attention_mask=mask).last_hidden_state[mask], exact[mask])
        ours_bf16 = ours.bfloat16()(ids, mask)
    assert ours_bf16.dtype == torch.bfloat16
    # measured 0.017 against the reference's 0.021: ours keeps RoPE and the soft-capped scores in fp32
    assert max_rel_err(ours_bf16[mask], exact[mask]) <= 1.5 * ref_err


def test_bf16_embeddings_are_scaled_by_the_rounded_factor_like_the_reference():
    """sqrt(hidden_size) rounded to the activation dtype first (sqrt(48) -> 6.9375 in bf16), as the reference
    does: the first layer gets the same bf16 input, bit for bit."""
    ref, ours = tiny_pair(seed=5)
    ids, mask = pad(random_prompts([6, 3], seed=6), 6, "left")
    seen = {}

    def first_layer_input(name):
        def hook(module, args, kwargs):
            seen[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    for name, model in (("ref", ref), ("ours", ours)):
        model.layers[0].register_forward_pre_hook(first_layer_input(name), with_kwargs=True)
    with torch.no_grad():
        ref.bfloat16()(input_ids=ids, attention_mask=mask)
        ours.bfloat16()(ids, mask)
    assert seen["ours"].dtype == torch.bfloat16 and torch.equal(seen["ours"][0], seen["ref"][mask])


def test_token_outputs_do_not_depend_on_padding():
    _, ours = tiny_pair(seed=5)
    prompts = random_prompts([9, 4, 1], seed=6)
    with torch.no_grad():
        alone = [ours(prompt[None], torch.ones(1, len(prompt), dtype=torch.bool))[0] for prompt in prompts]
        for width in (9, 40):  # to the longest prompt, and far past it (more padding than the window)
            for side in ("left", "right"):
                ids, mask = pad(prompts, width, side)
                out = ours(ids, mask)
                for row, expected in enumerate(alone):
                    assert_parity(out[row][mask[row]], expected, tol=2e-5)


def test_float16_weights_still_run():
    """The pipeline never runs the encoder in float16 (mirage.precision), but a user may: it stays close to fp32 on
    real tokens here (measured 1.9e-3), at activations far below float16's range."""
    _, ours = tiny_pair()
    ids, mask = pad(random_prompts([6, 3]), 6, "left")
    with torch.no_grad():
        full = ours(ids, mask)
        half = ours.half()(ids, mask)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert max_rel_err(half.float()[mask], full[mask]) < 1e-2


# ---- full size ------------------------------------------------------------------------------


@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int = 0, pool_size: int = 2**25) -> None:
    """randomize_'s scales at memory speed, in place (no second copy of a 10 GB model): each tensor is a window
    of one shared pool of normals that starts at its own random offset. The pool is longer than any layer
    matrix, so no two rows of one matrix are equal; only the 590M-entry embedding table wraps around."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(2 * pool_size, generator=gen)  # doubled: every window of <= pool_size is one slice
    for p in module.parameters():
        std = p.shape[-1] ** -0.5 if p.ndim == 2 else 0.5
        flat = p.view(-1)
        for start in range(0, flat.numel(), pool_size):
            chunk = flat[start : start + pool_size]
            offset = int(torch.randint(pool_size, (), generator=gen))
            torch.mul(pool[offset : offset + chunk.numel()], std, out=chunk)


def full_size_check() -> dict:
    """Random 2B weights shared by the reference and ours; run in a fresh process so its peak memory is its own."""
    import resource

    config = T5GemmaConfig().encoder
    with torch.device("meta"):
        ref = RefEncoder(config)
    ref = ref.to_empty(device="cpu").eval().requires_grad_(False)
    ref.rotary_emb = RefRotaryEmbedding(config)  # its inv_freq buffer, which to_empty left unset
    fill_random_(ref)
    ours = build_strict(TextEncoderConfig(), ref.state_dict())  # assign=True: the very same tensors
    assert ours.embed_tokens.weight.data_ptr() == ref.embed_tokens.weight.data_ptr()
    ids, mask = pad(random_prompts([6, 3], vocab=256000), 6, "left")
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    return {"err": max_rel_err(got[mask], expected[mask]), "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def test_full_size_2b_forward_matches():
    here = Path(__file__).parent
    script = "import json, test_text_encoder as t; print(json.dumps(t.full_size_check()))"
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=here, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")])},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["err"] <= 2e-5, result
    assert result["peak_gb"] < 14, result


def test_only_real_tokens_are_computed():
    """The prompts are packed: every layer sees the batch's N real tokens, not B x L (the work of a CFG batch with an
    empty negative prompt about halves), and each prompt still equals the reference's."""
    ref, ours = tiny_pair(seed=7)
    ids, mask = pad(random_prompts([11, 1], seed=8), 11, "left")  # a prompt and an empty negative (<bos> only)
    seen = []
    hook = ours.layers[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        got = ours(ids, mask)
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    hook.remove()
    assert seen == [(1, 12, TINY["hidden_size"])]
    assert_parity(got[mask], expected[mask], tol=2e-5)
