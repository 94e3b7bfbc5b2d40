"""Which dtype each model runs in: the pipeline's, except where that is known to go wrong.

- float16 is not used for a model whose class says `fp16_safe = False`: the T5Gemma encoder (Gemma-2
  activations) and both VAEs (see each module's docstring for the evidence). They run in bfloat16,
  float32's range at float16's size, or in float32 where the device has no native bfloat16. The
  transformer runs in float16 when asked.
- bfloat16 on a device without native bfloat16 kernels becomes float32: there (AVX2-only CPUs) PyTorch
  runs bf16 matrix products and convolutions on reference paths, measured 100-200x slower than fp32.
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
        reason = "its activations overflow float16"
    elif requested == torch.bfloat16 and not native_bf16(device):
        dtype, reason = torch.float32, f"no native bfloat16 kernels on this {device.type}"
    else:
        return requested
    _log_once(f"running {model_class.__name__} in {str(dtype).removeprefix('torch.')}: {reason}")
    return dtype


@functools.cache
def _log_once(message: str) -> None:
    """The pipeline asks again at every call (sizing memory, reloading a freed model); one line says it all."""
    log.warning(message)


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products and convolutions run on fast native kernels on this device."""
    if device.type == "cpu":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's bf16 kernels: AVX-512 CPUs on
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere and later
    return device.type == "mps"
