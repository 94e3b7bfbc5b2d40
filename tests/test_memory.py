"""Lazy loading, freeing the text encoder, offload modes and compiled blocks change no output."""

import pytest
import torch

from mirage import memory
from mirage.pipeline import MiragePipeline

PROMPT = "a lighthouse on a cliff at dawn"


def generate(pipe, **kwargs):
    return pipe(PROMPT, seed=1, num_inference_steps=2, output_type="latent", progress=False, **kwargs)


@pytest.fixture(scope="module")
def baseline(mirage_flux):
    return generate(MiragePipeline.from_pretrained(mirage_flux, device="cpu", keep_text_encoder=True))


def test_models_load_on_first_use_and_the_text_encoder_can_go(mirage_flux, baseline):
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", keep_text_encoder=False)
    assert pipe.models == {}  # opening a folder reads no weights
    assert torch.equal(generate(pipe), baseline)
    assert sorted(pipe.models) == ["transformer"]  # text encoder freed; the VAE is not needed for latents
    assert torch.equal(generate(pipe), baseline)  # and reloaded when needed again


def test_the_text_encoder_stays_when_memory_is_ample(mirage_flux, monkeypatch):
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 40)
    generate(pipe)
    assert "text_encoder" in pipe.models
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    generate(pipe)
    assert "text_encoder" not in pipe.models


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_modes_give_the_same_latents(mirage_flux, baseline, offload):
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", offload=offload)
    moves = []
    original = torch.nn.Module.to
    torch.nn.Module.to = lambda module, *args, **kwargs: moves.append(type(module).__name__) or original(module, *args, **kwargs)
    try:
        latents = generate(pipe)
    finally:
        torch.nn.Module.to = original
    assert torch.equal(latents, baseline)
    if offload == "model":
        assert {"T5GemmaEncoder", "MirageTransformer"} <= set(moves)
    else:  # every transformer block and encoder layer went to the device and back on its own
        assert moves.count("Block") == 2 * 2 * len(pipe.transformer.blocks)
        assert moves.count("EncoderLayer") == 2 * pipe.config.text_encoder.num_hidden_layers


def test_unknown_offload_mode_is_refused(mirage_flux):
    with pytest.raises(ValueError, match="offload"):
        MiragePipeline.from_pretrained(mirage_flux, device="cpu", offload="disk")


def test_compiled_blocks_equal_eager(mirage_flux, baseline):
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", compile=True)
    torch._dynamo.reset()
    assert torch.allclose(generate(pipe), baseline, rtol=1e-4, atol=1e-5)
