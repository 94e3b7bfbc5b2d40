"""Where weights live: on the device, or in CPU memory and on the device only while they run.

Model offload moves a whole model to the device for its turn (text encoder, then transformer, then VAE)
and back, so the device holds one model at a time. Block streaming (`offload="sequential"`) goes further:
every weight stays in CPU memory and each part of a model (a transformer block, an encoder layer, the
VAE's decoder, a small projection) is copied in just before it runs, so the device holds one part's
weights; an embedding table (the text encoder's is 1.2 GB) never moves, as only a few of its rows are read.
"""

import math
import os
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

# Device memory must exceed this many times the weights for everything to stay loaded between calls:
# the rest is activations (attention over 4096 image tokens at 1024 px), the VAE's large feature maps,
# and the CPU copies a format conversion makes while loading.
AMPLE_FACTOR = 2.0
MEMINFO = Path("/proc/meminfo")  # Linux's memory and swap sizes
CGROUP = Path("/sys/fs/cgroup")  # in a container, its memory limits: cgroup v2's files here, v1's in memory/


@contextmanager
def on_device(model: nn.Module, device: torch.device, offload: str | None):
    """Run `model` on `device` inside the block. Model offload moves it there and back to the CPU afterwards;
    with sequential offload its parts visit during their calls, and a call stopped midway (an error, Ctrl-C)
    still leaves every part's CPU tensors in place, so a LoRA fused afterwards is not written into stale copies."""
    if offload is None:
        yield model
        return
    try:
        if offload == "model":
            model.to(device)  # inside the try: a move that runs out of memory halfway is undone
        yield model
    finally:
        if offload == "model":
            model.to("cpu")
        else:
            for module in model.modules():
                go_home(getattr(module, "streamed_home", []))  # a part whose call did not finish


def go_home(undo: list) -> None:
    """Put back the CPU tensors that a streamed part lent out for its call (see `visit_while_called`)."""
    for restore in undo:
        restore()
    undo.clear()


def stream_parts(model: nn.Module, device: torch.device) -> None:
    """Keep the model's weights in CPU memory; each child, or each block of a list of them, visits `device` only
    while it runs, and an embedding table is read where it is."""
    for child in model.children():
        for block in child if isinstance(child, nn.ModuleList) else [child]:
            if isinstance(block, nn.Embedding):
                look_up_in_place(block, device)
            else:
                stream(block, device)


def look_up_in_place(embedding: nn.Embedding, device: torch.device) -> None:
    """Look token ids up in the table where it is (CPU memory) and send only the rows found to `device`."""
    embedding.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.device),))
    embedding.register_forward_hook(lambda module, args, output: output.to(device))


def stream(block: nn.Module, device: torch.device) -> None:
    """Hooks that bring the block, and each of its parts that owns weights, to `device` for a call. A part
    called within the block's forward finds itself there already; a part called on its own (the text K/V
    projection and the modulation run once per generation, outside any block's forward) makes the trip alone."""
    for module in block.modules():  # the block first
        if module is block or next(module.parameters(recurse=False), None) is not None:
            visit_while_called(module, device)


def visit_while_called(module: nn.Module, device: torch.device) -> None:
    """Give the module copies of its weights on `device` for each call, unless they are there already, and
    its own CPU tensors back after the call: nothing is copied back, since the weights did not change. The
    restores wait in `module.streamed_home` until then (`on_device` runs them if the call never returns)."""
    undo = module.streamed_home = []

    def arrive(module, args):
        if next(module.parameters()).is_cpu:
            for owner in module.modules():
                for name, tensor in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
                    undo.append(partial(setattr, owner, name, tensor))
                    setattr(owner, name, copy_to(tensor, device))

    def leave(module, args, output):
        go_home(undo)

    module.register_forward_pre_hook(arrive)
    module.register_forward_hook(leave)


def copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tensor on `device`; a parameter stays a parameter."""
    copy = tensor.to(device)
    return nn.Parameter(copy, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else copy


def is_ample(device: torch.device, weight_bytes: int) -> bool:
    """Whether `device` has room to keep every model loaded (AMPLE_FACTOR x the weights' size as loaded)."""
    return available_bytes(device) > AMPLE_FACTOR * weight_bytes


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`, or the best figure the OS gives for it."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):  # torch >= 2.5
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()  # Metal's budget, unused part
    for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):  # free memory (Linux), else all of it (macOS has only that)
        try:
            return os.sysconf(name) * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            continue
    return 0  # no figure (Windows): assume memory is tight, so the text encoder is freed and read again when needed


def total_bytes(device: torch.device) -> int:
    """The most memory a call on `device` could ever use, or 0 where there is no such bound: a CUDA GPU's own memory
    (not on Windows, whose driver may spill into system memory), and a Linux CPU's memory and swap, within a
    container's limits. macOS grows its swap as needed, for the CPU and Apple GPUs alike."""
    if device.type == "cuda":
        return 0 if os.name == "nt" else torch.cuda.mem_get_info(device)[1]
    if device.type != "cpu":
        return 0
    try:  # Linux: "MemTotal:       24684084 kB" and so on
        fields = dict(line.split(":", 1) for line in MEMINFO.read_text().splitlines())
        ram, swap = (int(fields[name].split()[0]) * 1024 for name in ("MemTotal", "SwapTotal"))
    except (OSError, KeyError, ValueError):
        return 0
    ram = min(ram, _cgroup_limit("memory.max"), _cgroup_limit("memory/memory.limit_in_bytes"))
    swap = min(swap, _cgroup_limit("memory.swap.max"))  # v2 limits swap alone, v1 memory and swap together
    return min(ram + swap, _cgroup_limit("memory/memory.memsw.limit_in_bytes"))


def _cgroup_limit(name: str) -> float:
    """A cgroup limit in bytes, as a container sees its own, or inf: v2's "max", or no such file (the other cgroup
    version, v1 without swap accounting, or the host's root cgroup, which has no limits). v1 writes "no limit" as a
    number near 2**63, larger than any memory."""
    try:
        text = (CGROUP / name).read_text().strip()
    except OSError:
        return math.inf
    return math.inf if text == "max" else int(text)
