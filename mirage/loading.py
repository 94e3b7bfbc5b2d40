"""Reading safetensors files and building models from them, strictly.

Models are built on the meta device (no memory, no random init) and then take the checkpoint's
tensors with `load_state_dict(strict=True, assign=True)`, so loading costs one read of the file and a
missing, unexpected or misshapen key is an error that names it.
"""

import json
import re
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .configs import MirageConfig

M = TypeVar("M", bound=nn.Module)


class CheckpointError(RuntimeError):
    """A weights file or folder that cannot be used as it is; the message says what to do."""


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (memory-mapped on CPU), or a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: convert a checkpoint first (python convert_weights.py SRC OUT)")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}): convert the checkpoint again") from None


def read_config(folder: str | Path) -> MirageConfig:
    """The `config.json` of a converted checkpoint folder, or a CheckpointError saying how to make one."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a converted checkpoint (no config.json): run python convert_weights.py SRC {folder}"
        )
    try:
        return MirageConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a valid mirage config ({err}): convert the checkpoint again") from None


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a CheckpointError naming every missing, unexpected or misshapen key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)} in all)"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshapen))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source} does not fit the {type(model).__name__} config: " + "; ".join(problems))


def build_model(
    make: Callable[[], M],
    state_dict: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "checkpoint",
) -> M:
    """Build `make()` on the meta device and give it the checkpoint's tensors (strict, no copies on CPU)."""
    with torch.device("meta"):
        model = make()
    check_state_dict(model, state_dict, source)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    state_dict = {k: v.to(device) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# Photoroom's training codebase (Photoroom/PRX models/prx.py) -> diffusers, inside `blocks.{i}.`;
# its RMSNorm calls its weight `scale` in some versions and `weight` in others.
ORIGINAL_BLOCK_RENAMES = {
    "img_qkv_proj.weight": "attention.img_qkv_proj.weight",
    "txt_kv_proj.weight": "attention.txt_kv_proj.weight",
    "qk_norm.query_norm.scale": "attention.norm_q.weight",
    "qk_norm.query_norm.weight": "attention.norm_q.weight",
    "qk_norm.key_norm.scale": "attention.norm_k.weight",
    "qk_norm.key_norm.weight": "attention.norm_k.weight",
    "k_norm.scale": "attention.norm_added_k.weight",
    "k_norm.weight": "attention.norm_added_k.weight",
    "attn_out.weight": "attention.to_out.0.weight",
}


def rename_original_key(key: str) -> str:
    """An original-codebase transformer key in diffusers' (= mirage's) naming; every other key as it is."""
    match = re.fullmatch(r"(blocks\.\d+\.)(.+)", key)
    if match and match[2] in ORIGINAL_BLOCK_RENAMES:
        return match[1] + ORIGINAL_BLOCK_RENAMES[match[2]]
    return key
