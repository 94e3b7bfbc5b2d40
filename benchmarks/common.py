"""What the benchmark scripts share: the options that say what is measured and their checks, timing and peak
memory, empty compile caches per worker process, our models loaded as the pipeline loads them, and the text
masks of a CFG batch."""

import argparse
import os
import resource
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from checkpoint import DEFAULT_CACHE

from mirage.configs import DCAE_SANA_1_1, PRX_DCAE, PRX_FLUX, VAE_TYPES, FluxVAEConfig
from mirage.loading import load_model
from mirage.pipeline import compile_model, pick_device
from mirage.precision import DTYPES, native, run_dtype

PIXEL_MULTIPLE = {  # one latent patch in pixels: 8 x 2 (Flux VAE), 32 x 1 (DC-AE)
    "flux": FluxVAEConfig().spatial_compression * PRX_FLUX.patch_size,
    "dc-ae": DCAE_SANA_1_1.spatial_compression * PRX_DCAE.patch_size,
}
TOKENIZER_MAX_LENGTH = 256  # PRX's tokenizer_config: the reference pads every prompt to it


# ---- options ---------------------------------------------------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser, device: str = "cpu") -> None:
    """--device, --dtype, --resolution, --vae and --cache: where, in what, at what size and on which checkpoint."""
    parser.add_argument("--device", default=device, help=f"cpu or cuda (default: {device})")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 where it is native, else fp32")
    parser.add_argument("--resolution", type=int, default=512, help="square image side in pixels (default: 512)")
    parser.add_argument("--vae", default="flux", choices=VAE_TYPES, help="which VAE (and transformer) (default: flux)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"checkpoint cache ({DEFAULT_CACHE})")


def check_model_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse in one line what cannot be measured; normalise the device ("cpu:0" is "cpu") and choose the dtype.

    A dtype without native kernels on the device is refused: mirage would run fp32 there (mirage.precision), so
    the measurement would not be of that dtype, and diffusers would run slow emulated kernels."""
    try:
        device = pick_device(args.device)
    except ValueError as err:
        parser.error(f"--device {args.device}: {err}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: the benchmarks run on cpu or cuda")
    args.device = "cpu" if device.type == "cpu" else str(device)
    args.dtype = args.dtype or ("bf16" if native(torch.bfloat16, device) else "fp32")
    if not native(DTYPES[args.dtype], device):
        parser.error(f"--dtype {args.dtype}: this {device.type} has no native {args.dtype} kernels (mirage would run "
                     "fp32, diffusers slow emulated kernels): use --dtype fp32")  # fmt: skip
    multiple = PIXEL_MULTIPLE[args.vae]
    if args.resolution < multiple or args.resolution % multiple:
        parser.error(f"--resolution must be a positive multiple of {multiple} with the {args.vae} VAE")


# ---- measuring -------------------------------------------------------------------------------------------------


class Timer:
    """Calls a function n times and keeps the best wall and CPU seconds of each timed part."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats
        self.wall, self.cpu = {}, {}

    def __call__(self, part: str, fn, repeats: int | None = None):
        """-> the last call's result."""
        for _ in range(repeats or self.repeats):
            self._sync()
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            self._sync()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            self.wall[part] = min(wall, self.wall.get(part, wall))
            self.cpu[part] = min(cpu, self.cpu.get(part, cpu))
        return result

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_memory(device: torch.device) -> int:
    """Bytes: the process's peak RSS on CPU, the peak allocated GPU memory on CUDA.

    On Linux the peak is /proc's VmHWM, this process image's own: ru_maxrss starts a child at the RSS of the
    parent it forked from."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))  # in kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, the only other source


@contextmanager
def empty_compile_caches():
    """The environment for a worker process whose compile caches (torch's and Triton's on-disk ones) start empty
    and are deleted afterwards: its cold compiled run compiles, whatever ran before it."""
    with tempfile.TemporaryDirectory(prefix="mirage-bench-caches-") as caches:
        yield {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor", "TRITON_CACHE_DIR": f"{caches}/triton"}


# ---- inputs ----------------------------------------------------------------------------------------------------


def load_ours(folder: Path, name: str, model_class, config, device, dtype: torch.dtype, compile: bool = False):
    """Our model `name` as MiragePipeline loads it: in the dtype the pipeline runs it in (mirage.precision may
    change the requested one), compiled as `compile=True` compiles it (its first run then compiles)."""
    dtype = run_dtype(model_class, dtype, device)
    model = load_model(lambda: model_class(config), Path(folder) / f"{name}.safetensors", device, dtype)
    return compile_model(model, name) if compile else model


def left_padded_mask(lengths: list[int], length: int, device="cpu") -> torch.Tensor:
    """[len(lengths), length] bool: row b's last lengths[b] positions are real tokens, as the tokenizer pads on the
    left. A CFG batch's rows are the negative prompt's, then the prompt's."""
    return torch.arange(length, device=device) >= length - torch.tensor(lengths, device=device)[:, None]
