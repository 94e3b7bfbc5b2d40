"""The dtype policy: float16 only for fp16-safe models, float32 where bfloat16 or float16 has no native kernels."""

import logging
from types import SimpleNamespace

import pytest
import torch

from mirage import precision
from mirage.pipeline import MiragePipeline
from mirage.precision import run_dtype
from mirage.text_encoder import T5GemmaEncoder
from mirage.transformer import MirageTransformer
from mirage.vae_dcae import DCAE
from mirage.vae_flux import FluxVAE


@pytest.mark.parametrize("native_bf16", [True, False])
def test_policy(native_bf16, monkeypatch, caplog):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native_bf16)
    monkeypatch.setattr(precision, "native_fp16", lambda device: True)
    precision._log_once.cache_clear()  # an earlier test may have logged these already
    half_fallback = torch.bfloat16 if native_bf16 else torch.float32
    with caplog.at_level(logging.WARNING, logger="mirage"):
        for model_class in (T5GemmaEncoder, FluxVAE, DCAE):
            assert run_dtype(model_class, torch.float16, "cpu") == half_fallback
            assert caplog.messages[-1] == (
                f"running {model_class.__name__} in {str(half_fallback)[6:]}: its activations may overflow float16"
            )
        caplog.clear()
        assert run_dtype(MirageTransformer, torch.float16, "cpu") == torch.float16
        for model_class in (MirageTransformer, T5GemmaEncoder, FluxVAE, DCAE):
            assert run_dtype(model_class, torch.float32, "cpu") == torch.float32
        assert not caplog.messages
        assert run_dtype(FluxVAE, torch.bfloat16, "cpu") == (torch.bfloat16 if native_bf16 else torch.float32)
        expected = [] if native_bf16 else ["running FluxVAE in float32: no native bfloat16 kernels on this cpu"]
        assert caplog.messages == expected
        caplog.clear()
        assert run_dtype(FluxVAE, torch.bfloat16, "cpu") == run_dtype(FluxVAE, torch.float16, "cpu") == half_fallback
        assert not caplog.messages  # said once per process, however often the pipeline asks


def test_native_bf16_is_known_per_device():
    assert precision.native_bf16(torch.device("meta")) is False
    assert isinstance(precision.native_bf16(torch.device("cpu")), bool)


@pytest.mark.parametrize("bf16, fp16", [(True, False), (False, True)])
def test_cpu_kernels_are_asked_per_dtype(bf16, fp16, monkeypatch):
    """oneDNN has bf16 kernels on AVX-512 CPUs and fp16 ones only with AVX-512-FP16 or AMX-FP16: asked apart.
    float16's products and convolutions are native on CUDA and Apple GPUs, never on the meta device."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: fp16)
    cpu = torch.device("cpu")
    assert (precision.native_bf16(cpu), precision.native_fp16(cpu)) == (bf16, fp16)
    assert precision.native(torch.bfloat16, cpu) is bf16 and precision.native(torch.float16, cpu) is fp16
    assert [precision.native_fp16(torch.device(d)) for d in ("cuda", "mps", "meta")] == [True, True, False]


def test_float16_without_native_kernels_runs_float32(monkeypatch, caplog):
    """AVX2 CPUs: PyTorch's fp16 products there run on slow reference paths (a full-width block 3x fp32's time)."""
    monkeypatch.setattr(precision, "native_fp16", lambda device: False)
    precision._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="mirage"):
        assert run_dtype(MirageTransformer, torch.float16, "cpu") == torch.float32
    assert caplog.messages == ["running MirageTransformer in float32: no native float16 kernels on this cpu"]


def test_a_pipeline_in_float16_without_native_kernels_runs_float32_throughout(mirage_flux, monkeypatch, caplog):
    # One line names what happens: every model in float32, not only the transformer.
    monkeypatch.setattr(precision, "native_fp16", lambda device: False)
    precision._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="mirage"):
        pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", dtype="fp16", keep_text_encoder=True)
        pipe("a fox", num_inference_steps=1, height=64, width=64, progress=False)
    assert caplog.messages == ["running every model in float32: no native float16 kernels on this cpu"]
    dtypes = {name: {p.dtype for p in model.parameters()} for name, model in pipe.models.items()}
    assert dtypes == {name: {torch.float32} for name in ("text_encoder", "transformer", "vae")}


def test_native_bf16_asks_the_cuda_device_named(monkeypatch):
    """cuda:1 may be a T4 (compute capability 7.5) beside an A100 as cuda:0, the current device."""
    majors = {0: 8, 1: 7}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(major=majors[torch.device(device).index or 0]))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # the current one's
    assert precision.native_bf16(torch.device("cuda:0")) and not precision.native_bf16(torch.device("cuda:1"))


@pytest.mark.parametrize("macos", [(14, 0), (13, 5)])
def test_bf16_on_apple_gpus_needs_macos_14(macos, monkeypatch):
    """torch refuses bf16 tensors on MPS before macOS 14 ("MPS BFloat16 is only supported on MacOS 14 or newer")."""
    macos_14 = macos >= (14, 0)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) <= macos)
    assert precision.native_bf16(torch.device("mps")) is macos_14
    precision._log_once.cache_clear()
    expected = torch.bfloat16 if macos_14 else torch.float32
    assert run_dtype(MirageTransformer, torch.bfloat16, "mps") == run_dtype(FluxVAE, torch.float16, "mps") == expected
