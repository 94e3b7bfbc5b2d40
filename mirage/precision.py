"""Which dtype each model runs in: the pipeline's, except where that is known to go wrong.

- float16 is not used for a model whose class says `fp16_safe = False`: the T5Gemma encoder (Gemma-2
  activations) and both VAEs (each module gives the evidence). They run in bfloat16,
  float32's range at float16's size, or in float32 where the device has no native bfloat16. The
  transformer runs in float16 when asked.
- bfloat16 or float16 on a device without native kernels for it becomes float32, for a pipeline's every model
  (`pipeline_dtype`): there (AVX2-only CPUs)
  PyTorch runs half-precision matrix products and convolutions on reference paths, measured 100-200x
  slower than fp32 for bf16, and a full-width transformer block 3x slower in fp16.
Every change is logged in one line, once per process.
"""

import functools
import logging

import torch

log = logging.getLogger("mirage")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the names command lines take


def run_dtype(model_class: type, requested: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype to run `model_class` in when the pipeline asks for `requested` on `device`."""
    device = torch.device(device)
    if requested == torch.float16 and not model_class.fp16_safe:
        dtype = torch.bfloat16 if native_bf16(device) else torch.float32
        reason = "its activations may overflow float16"
    elif not native(requested, device):
        dtype, reason = torch.float32, f"no native {dtype_name(requested)} kernels on this {device.type}"
    else:
        return requested
    _log_once(f"running {model_class.__name__} in {dtype_name(dtype)}: {reason}")
    return dtype


def pipeline_dtype(requested: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype a pipeline asks its models for: `requested`, or float32 where the device has no native kernels for
    it, and then every model runs in float32."""
    device = torch.device(device)
    if native(requested, device):
        return requested
    _log_once(f"running every model in float32: no native {dtype_name(requested)} kernels on this {device.type}")
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: how messages name a dtype."""
    return str(dtype).removeprefix("torch.")


@functools.cache
def _log_once(message: str) -> None:
    """The pipeline asks again at every call (sizing memory, reloading a freed model); one line says it all."""
    log.warning(message)


def native(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether matrix products and convolutions in `dtype` run on fast kernels on this device (float32's always do)."""
    if dtype == torch.bfloat16:
        return native_bf16(device)
    if dtype == torch.float16:
        return native_fp16(device)
    return True


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products and convolutions run on fast native kernels on this device."""
    if device.type == "cpu":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's bf16 kernels: AVX-512 CPUs on
    if device.type == "cuda":  # Ampere and later; asked of this device, where is_bf16_supported asks the current one
        return torch.cuda.get_device_properties(device).major >= 8
    return device.type == "mps" and torch.backends.mps.is_macos_or_newer(14, 0)  # torch refuses bf16 on older macOS


def native_fp16(device: torch.device) -> bool:
    """Whether float16 matrix products and convolutions run on fast native kernels on this device."""
    if device.type == "cpu":
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()  # oneDNN's fp16 kernels: AVX-512-FP16 or AMX-FP16 CPUs
    return device.type in ("cuda", "mps")
