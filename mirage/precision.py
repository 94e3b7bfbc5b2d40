"""Which dtype each model runs in: the pipeline's, except where that is known to go wrong.

- float16 is never used for the text encoder or the VAEs: Gemma-2 style encoders and the Flux VAE overflow
  its 65504 range with trained weights, and Photoroom runs DC-AE in fp32 (see each module's docstring for
  the measurements). They run in bfloat16 instead, which has float32's range at float16's size; float32
  where the device has no native bfloat16. The transformer runs in float16 when asked.
- bfloat16 convolutions on a CPU without native bfloat16 (AVX2-only) take a reference path ~100x slower
  than float32, so the VAEs run in float32 there.
Every change is logged in one line.
"""

import logging

import torch

log = logging.getLogger("mirage")


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's bf16 path: AVX512-BF16 or AMX
    return True


def text_encoder_dtype(requested: torch.dtype, device: torch.device) -> torch.dtype:
    if requested != torch.float16:
        return requested
    return _changed("text encoder", requested, _wide_half(device), "Gemma-2 activations overflow float16")


def vae_dtype(vae_type: str, requested: torch.dtype, device: torch.device) -> torch.dtype:
    if requested == torch.float16:
        return _changed(f"{vae_type} VAE", requested, _wide_half(device), "its activations overflow float16")
    if requested == torch.bfloat16 and device.type == "cpu" and not native_bf16(device):
        return _changed(f"{vae_type} VAE", requested, torch.float32, "this CPU has no native bfloat16 convolutions")
    return requested


def _wide_half(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if native_bf16(device) else torch.float32


def _changed(what: str, requested: torch.dtype, dtype: torch.dtype, why: str) -> torch.dtype:
    name = str(dtype).removeprefix("torch.")
    log.warning("running the %s in %s, not %s: %s", what, name, str(requested).removeprefix("torch."), why)
    return dtype
