"""Where weights live: on the device, or in CPU memory and on the device only while they run.

Model offload moves a whole model to the device for its turn (text encoder, then transformer, then VAE)
and back, so the device holds one model at a time. Block streaming (`offload="sequential"`) goes further:
the small parts of a model stay on the device and its repeated blocks (transformer blocks, encoder
layers) are moved in one at a time just before they run, so the device holds one block of weights.
"""

import os
from contextlib import contextmanager

import torch
from torch import nn

# Device memory must exceed this many times the weights for everything to stay loaded between calls:
# the rest is activations (attention over 4096 image tokens at 1024 px), the VAE's large feature maps,
# and the CPU copies a format conversion makes while loading.
AMPLE_FACTOR = 2.0


@contextmanager
def on_device(model: nn.Module, device: torch.device, enabled: bool):
    """Run `model` on `device` inside the block and move it back to the CPU afterwards (if enabled)."""
    if not enabled:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")


def stream_blocks(model: nn.Module, device: torch.device) -> None:
    """Keep the model's repeated blocks in CPU memory and move each to `device` only while it runs."""
    blocks = repeated_blocks(model)
    streamed = {id(p) for block in blocks for p in block.parameters()}
    for param in model.parameters():
        if id(param) not in streamed:
            param.data = param.data.to(device)

    def arrive(block, args):
        block.to(device)

    def leave(block, args, output):
        block.to("cpu")

    for block in blocks:
        block.register_forward_pre_hook(arrive)
        block.register_forward_hook(leave)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the model's top-level block lists (transformer blocks, encoder layers; none in a VAE)."""
    return [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]


def is_ample(device: torch.device, weight_bytes: int) -> bool:
    """Whether `device` has room to keep every model loaded (AMPLE_FACTOR x the weights' size as loaded)."""
    return available_bytes(device) > AMPLE_FACTOR * weight_bytes


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no such figure on this OS: assume there is room
        return 1 << 62
    return pages * os.sysconf("SC_PAGE_SIZE")
