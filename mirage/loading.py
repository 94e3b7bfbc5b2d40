"""Reading safetensors files and building models from them, strictly.

Models are built on the meta device (no memory, no random init) and then take the checkpoint's
tensors with `load_state_dict(strict=True, assign=True)`, so loading costs one read of the file and a
missing, unexpected or misshapen key is an error that names it.
"""

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .configs import MirageConfig
from .precision import dtype_name

M = TypeVar("M", bound=nn.Module)


class CheckpointError(RuntimeError):
    """A weights file or folder that cannot be used as it is; the message says what to do."""


RECONVERT = "convert the checkpoint again"  # what a damaged converted file needs (a source needs fetching again)


def read_safetensors(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, remedy: str = RECONVERT
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, floating ones in `dtype` if given, or a CheckpointError naming the file and,
    for a damaged one, the `remedy` (convert_weights.py's sources are downloaded or copied again instead).

    A file whose floating tensors all keep their stored dtype is memory-mapped (no copy). Otherwise every tensor,
    those already in `dtype` too, is read and converted (copied) one at a time: converting a memory-mapped file
    keeps every page of it resident until the last tensor is done, so a bf16 text encoder loaded in fp32 would
    peak at 1.5x its fp32 size.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: convert a checkpoint first (python convert_weights.py SRC OUT)")
    with _reading(path, remedy):
        data_start, header = _validated_header(path)
        stored = {_STORED[entry["dtype"]] for entry in header.values()}
        if dtype is None or all(t == dtype or not t.is_floating_point for t in stored):
            return load_file(path, device=str(device))
        return _read_converted(path, data_start, header, torch.device(device), dtype)


def check_file(make: Callable[[], nn.Module], path: Path) -> None:
    """Check the names, shapes and dtypes of a safetensors file against `make()` from the file's header alone, with
    no tensor read: a file that does not belong to the checkpoint fails when it is opened, not at its first use,
    perhaps after minutes of sampling."""
    with _reading(path, RECONVERT):
        _, header = _validated_header(path)
        tensors = {k: torch.empty(e["shape"], dtype=_STORED[e["dtype"]], device="meta") for k, e in header.items()}
    with torch.device("meta"):
        model = make()
    check_state_dict(model, tensors, str(path))


@contextmanager
def _reading(path: Path, remedy: str):
    """Report what reading the safetensors file `path` raises as a CheckpointError that names it and what to do."""
    try:
        yield
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise _unreadable(path, err, remedy) from None
    except torch.cuda.OutOfMemoryError:  # the name torch 2.4 has too
        raise  # loading onto a GPU without room: torch's message says so
    except RuntimeError as err:  # safe_open could not map the file: out of memory or address space, not a bad file
        raise CheckpointError(f"{path} could not be mapped into memory ({err}): free memory and try again") from None


def _unreadable(path: Path, err: Exception, remedy: str = RECONVERT) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file ({err}): {remedy}")


# safetensors' dtype names
_STORED = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _validated_header(path: Path) -> tuple[int, dict]:
    """`_safetensors_header` of a file that safetensors has checked: its header and its data offsets."""
    with safe_open(path, "pt"):
        pass
    return _safetensors_header(path)


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """-> (offset of the data, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file (unvalidated:
    see `_validated_header`)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")  # the file starts with its header's length, a little-endian u64
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def loaded_bytes(path: str | Path, dtype: torch.dtype | None = None) -> int:
    """The memory the tensors of a safetensors file take once read, floating ones in `dtype` if given."""
    try:
        _, header = _safetensors_header(Path(path))
        stored = {name: _STORED[entry["dtype"]] for name, entry in header.items()}
        return sum(
            math.prod(entry["shape"]) * (dtype if dtype and stored[name].is_floating_point else stored[name]).itemsize
            for name, entry in header.items()
        )
    except (OSError, ValueError, KeyError) as err:
        raise _unreadable(Path(path), err) from None


def _read_converted(path: Path, data_start: int, header: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Read each tensor with plain file reads into one reused buffer (no mapping keeps pages resident), then copy it
    out converted: the peak is the converted weights plus the largest stored tensor."""
    buffer = torch.empty(max((end - begin for begin, end in (e["data_offsets"] for e in header.values())), default=0),
                         dtype=torch.uint8)  # fmt: skip
    tensors = {}
    with open(path, "rb") as f:
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            f.seek(data_start + begin)
            f.readinto(buffer[: end - begin].numpy())
            stored = buffer[: end - begin].view(_STORED[entry["dtype"]]).reshape(entry["shape"])
            tensors[name] = stored.to(device, dtype if stored.is_floating_point() else stored.dtype, copy=True)
    return tensors


def read_config(folder: str | Path) -> MirageConfig:
    """The `config.json` of a converted checkpoint folder, or a CheckpointError saying how to make one."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.exists():
        raise CheckpointError(f"{folder} does not exist: run python convert_weights.py SRC {folder} to make it")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file: pass the checkpoint folder (the one that holds config.json)")
    if (folder / "model_index.json").is_file():  # converting into the source folder would be the wrong fix
        raise CheckpointError(
            f"{folder} is a diffusers pipeline, not a converted checkpoint: run python convert_weights.py {folder} OUT"
        )
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a converted checkpoint (no config.json): run python convert_weights.py SRC {folder}"
        )
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and ("_class_name" in data or "model_type" in data):
            raise CheckpointError(
                f"{folder} is one model of a diffusers pipeline, not a converted checkpoint: run python "
                f"convert_weights.py PIPELINE OUT on the folder that holds it"
            )
        return MirageConfig.from_dict(data)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a valid mirage config ({err}): convert the checkpoint again") from None


def check_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint", remedy: str = RECONVERT
) -> None:
    """Raise a CheckpointError naming missing, unexpected, misshapen and non-float keys (up to five of each, with
    their count), and the `remedy`."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    not_float = [
        f"{k} ({dtype_name(state_dict[k].dtype)})"
        for k, v in expected.items()
        if k in state_dict and v.is_floating_point() and not state_dict[k].is_floating_point()
    ]
    found = {"missing keys": missing, "unexpected keys": unexpected, "wrong shapes": misshapen, "not floating point": not_float}
    problems = [
        f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)} in all)"
        for label, keys in found.items()
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source} does not fit the {type(model).__name__} config: {'; '.join(problems)}: "
                              f"{remedy}")  # fmt: skip


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


def load_model(
    make: Callable[[], M], path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> M:
    """`make()` with the weights of one safetensors file, in `dtype` if given, on `device`."""
    return build_model(make, read_safetensors(path, device, dtype), device, dtype, source=str(path))


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
