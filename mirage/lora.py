"""LoRA for the Mirage transformer: low-rank updates of its linear layers, read from safetensors files.

A LoRA changes a linear layer's weight W [out, in] by  scale * alpha / rank * up @ down,  with down [rank, in]
and up [out, rank]: PEFT's convention, where alpha is the rank when a file gives none. diffusers and PEFT keep
alpha outside the tensors, in PEFT's LoraConfig (`lora_alpha`, `alpha_pattern`, `use_rslora`: alpha / sqrt(rank)):
the file's `lora_adapter_metadata`, or the `adapter_config.json` beside PEFT's `adapter_model.safetensors`.
Files come spelled four ways, told apart by their keys:
- diffusers / PEFT: `[transformer.]blocks.0.attention.img_qkv_proj.lora_A.weight` (down), `.lora_B.weight` (up),
  optionally `.alpha`; PEFT's own files prefix `base_model.model.`;
- trainers that name the model `diffusion_model`: `diffusion_model.blocks.0.attention.img_qkv_proj.lora_A.weight`;
- the original training codebase's layer names (`blocks.0.img_qkv_proj`, `blocks.0.attn_out`; the rename table
  is the converter's, in `mirage.loading`), with either of the prefixes above or none;
- kohya: `lora_unet_blocks_0_attention_img_qkv_proj.lora_down.weight`, `.lora_up.weight`, `.alpha`, the layer
  path with its dots written as underscores; since layer names hold underscores themselves, it is looked up
  among the model's real layer names.

A loaded LoRA starts unfused: each target layer becomes a `LoRALinear`, which adds the update to its output, so
the scale can change at no cost and the weights stay untouched. Fusing merges it into the weights instead (no
run-time cost): the weight becomes the original plus every fused update, summed in fp32 and cast once, always
from the original, which is kept on the CPU (no copy when the model is already there) while anything is fused.
Unloading therefore restores the weights bit for bit. Any number of LoRAs stack, fused or not.

The LoRA tensors are non-persistent buffers of small modules hung on the target layers: they follow the model
from device to device (offloading) but never enter its state dict, whose keys stay the checkpoint's.

Every file is checked against the model in full before anything changes: an unknown key, a layer the model
lacks, a rank or shape that does not fit, or a non-finite value raises a LoRAError that names the key, and
leaves the model as it was; a change stopped partway (out of memory while merging, Ctrl-C) is undone, see
`all_or_nothing`.
"""

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from .loading import rename_original_key

# The key of one LoRA tensor: the target layer, then which tensor it is (down, up, alpha), per convention.
PEFT_KEY = re.compile(r"(?P<layer>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha)")
KOHYA_KEY = re.compile(r"lora_unet_(?P<layer>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")
PARTS = {
    "lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"
}  # fmt: skip
PEFT_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")
TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te")  # diffusers' and kohya's names for text-encoder LoRAs
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LoRAError(ValueError):
    """A LoRA file or request that cannot be applied; the message names the key or LoRA, and nothing changed."""


@dataclass(frozen=True)
class LayerLoRA:
    """One file's update of one linear layer, checked against it."""

    down: Tensor  # [rank, in]
    up: Tensor  # [out, rank]
    alpha: float


# ---- reading and checking a file -------------------------------------------------------------------------------


def read_lora(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a LoRA safetensors file (on the CPU), with the alphas of its LoraConfig, if it has one, as
    `.alpha` tensors: from here on every format spells alpha the same way."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"LoRA file {path} does not exist")
    try:
        state_dict = load_file(path)
        with safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise LoRAError(f"{path} is not a readable safetensors file ({err})") from None
    config = lora_config(path, metadata)
    return with_config_alphas(state_dict, config) if config else state_dict


def lora_config(path: Path, metadata: dict[str, str]) -> dict | None:
    """The transformer's PEFT LoraConfig (as a dict), checked: diffusers writes it into a file's metadata, each
    setting prefixed by its model ("transformer.r") when a whole pipeline's LoRA was saved; PEFT writes
    adapter_config.json beside its adapter_model.safetensors. None without one."""
    beside = path.with_name("adapter_config.json")
    if "lora_adapter_metadata" in metadata:
        where, text = f"{path}'s lora_adapter_metadata", metadata["lora_adapter_metadata"]
    elif path.name == "adapter_model.safetensors" and beside.is_file():
        where, text = str(beside), beside.read_text(encoding="utf-8", errors="replace")
    else:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise LoRAError(f"{where} is not JSON ({err.msg}): save the LoRA again") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{where} is not a LoRA config (a JSON object): save the LoRA again")
    if any("." in key for key in config):  # a pipeline's: keep the transformer's settings (there may be none)
        config = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    return check_config(config, where) or None


def check_config(config: dict, where: str) -> dict:
    """The LoraConfig settings mirage reads, or a LoRAError naming the bad one."""
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise LoRAError(f"{where}: alpha_pattern must map layer names to alphas, got {patterns!r}")
    for alpha in (config.get("lora_alpha", 8), *patterns.values()):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise LoRAError(f"{where}: an alpha must be a number, got {alpha!r}")
    for key in patterns:
        try:
            peft_pattern(key)
        except re.error as err:
            raise LoRAError(f"{where}: alpha_pattern key {key!r} is not a regular expression ({err})") from None
    if config.get("use_dora"):
        raise LoRAError(f"{where} describes a DoRA (use_dora), which mirage does not apply")
    return config


def peft_pattern(key: str) -> re.Pattern:
    """PEFT's reading of an alpha_pattern key: a layer name, or a regular expression, matching the name's end."""
    return re.compile(rf"(.*\.)?({key})$")


def with_config_alphas(state_dict: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """The state dict with an `.alpha` for every layer that has none, taken from a LoraConfig as PEFT takes it: the
    first `alpha_pattern` key that matches the end of the layer's name, else `lora_alpha` (PEFT's default: 8); with
    `use_rslora` the update is scaled by alpha / sqrt(rank), written as the alpha that gives that over rank."""
    patterns = config.get("alpha_pattern") or {}
    alphas = {}
    for key, down in state_dict.items():
        match = PEFT_KEY.fullmatch(key)
        if not match or match["part"] != "lora_A.weight" or f"{match['layer']}.alpha" in state_dict:
            continue
        layer = match["layer"]
        layer = next((layer.removeprefix(p) for p in PEFT_PREFIXES if layer.startswith(p)), layer)  # the model's name
        matching = (a for k, a in patterns.items() if peft_pattern(k).match(layer))
        alpha = next(matching, config.get("lora_alpha", 8))
        if config.get("use_rslora") and down.ndim == 2:
            alpha *= math.sqrt(down.shape[0])
        alphas[f"{match['layer']}.alpha"] = torch.tensor(float(alpha))
    return {**state_dict, **alphas}


def lora_format(keys: list[str]) -> tuple[str, str]:
    """("kohya", "lora_unet_") or ("peft", its prefix: "transformer.", "diffusion_model.", "base_model.model." or
    ""), from the first key; the other keys are held to it when they are parsed."""
    if keys[0].startswith("lora_unet_"):
        return "kohya", "lora_unet_"
    return "peft", next((p for p in PEFT_PREFIXES if keys[0].startswith(p)), "")


def parse_lora(state_dict: dict[str, Tensor], model: nn.Module, source: str = "the LoRA") -> dict[str, LayerLoRA]:
    """The updates a LoRA state dict makes, by the model's layer path, each checked against its layer.

    Raises a LoRAError naming the first key that does not fit; reads the model, never changes it.
    """
    if not state_dict:
        raise LoRAError(f"{source} holds no tensors")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    keys = sorted(state_dict)
    text_encoder_key = next((key for key in keys if key.startswith(TEXT_ENCODER_PREFIXES)), None)
    if text_encoder_key is not None:
        raise LoRAError(f"{source}: {text_encoder_key} is for a text encoder; mirage applies LoRAs to the transformer")
    style, prefix = lora_format(keys)
    kohya_names = {name.replace(".", "_"): name for name in linears}
    found: dict[str, dict[str, str]] = {}  # layer path -> {"down" / "up" / "alpha": key}
    for key in keys:
        match = KOHYA_KEY.fullmatch(key) if style == "kohya" else PEFT_KEY.fullmatch(key.removeprefix(prefix))
        if match is None or not key.startswith(prefix):
            expected = (
                "lora_unet_<layer>.lora_down.weight / .lora_up.weight / .alpha" if style == "kohya"
                else f"{prefix}<layer>.lora_A.weight / .lora_B.weight / .alpha"
            )  # fmt: skip
            raise LoRAError(f"{source}: unknown key {key}: the file's first key makes it {style} ({expected})")
        if style == "kohya":
            layer = kohya_names.get(match["layer"], match["layer"])
        else:
            layer = rename_original_key(match["layer"] + ".weight").removesuffix(".weight")
        if layer not in linears:
            raise LoRAError(f"{source}: {key} targets {layer}, which is not a linear layer of this transformer")
        part = PARTS[match["part"]]
        if part in found.setdefault(layer, {}):
            raise LoRAError(f"{source}: {key} and {found[layer][part]} are both the {part} of {layer}")
        found[layer][part] = key
    return {layer: check_layer(state_dict, parts, layer, linears[layer], source) for layer, parts in found.items()}


def check_layer(
    state_dict: dict[str, Tensor], keys: dict[str, str], layer: str, linear: nn.Linear, source: str
) -> LayerLoRA:
    """The update of one layer from its keys {"down", "up", maybe "alpha"}, or a LoRAError naming the bad key."""
    for part in ("down", "up"):
        if part not in keys:
            raise LoRAError(f"{source}: {next(iter(keys.values()))} has no {part} weight beside it for {layer}")
    for key in (keys["down"], keys["up"]):
        if state_dict[key].dtype not in FLOAT_TYPES or not torch.isfinite(state_dict[key]).all():
            raise LoRAError(f"{source}: {key} must hold finite fp16, bf16, fp32 or fp64 values")
    down, up = state_dict[keys["down"]], state_dict[keys["up"]]
    shapes = f"{keys['down']} {tuple(down.shape)} and {keys['up']} {tuple(up.shape)}"
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise LoRAError(f"{source}: {shapes} must be [rank, in] and [out, rank] matrices of one rank > 0")
    if (up.shape[0], down.shape[1]) != (linear.out_features, linear.in_features):
        weight = f"{linear.out_features} x {linear.in_features}"
        raise LoRAError(f"{source}: {shapes} do not fit {layer}, whose weight is {weight}")
    if "alpha" not in keys:
        return LayerLoRA(down, up, alpha=float(down.shape[0]))
    alpha = state_dict[keys["alpha"]].float()
    if alpha.numel() != 1 or not torch.isfinite(alpha).all():
        raise LoRAError(f"{source}: {keys['alpha']} must be one finite number, got {alpha.tolist()}")
    return LayerLoRA(down, up, alpha.item())


# ---- the updates on the model ----------------------------------------------------------------------------------


class LoRAUpdate(nn.Module):
    """One LoRA's update of one linear layer: factor * up @ down, with factor = scale * alpha / rank."""

    def __init__(self, name: str, lora: LayerLoRA, scale: float, like: Tensor):
        super().__init__()
        self.name = name
        self.scale = scale
        self.alpha = lora.alpha
        self.fused = False
        # In the layer's dtype and on its device, like the weight it updates.
        self.register_buffer("down", lora.down.to(like.device, like.dtype), persistent=False)  # [rank, in]
        self.register_buffer("up", lora.up.to(like.device, like.dtype), persistent=False)  # [out, rank]

    @property
    def factor(self) -> float:
        return self.scale * self.alpha / self.down.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """The update of the layer's output for its input x [..., in] -> [..., out]."""
        return F.linear(F.linear(x, self.down), self.up) * self.factor  # [..., rank] -> [..., out]

    def delta(self) -> Tensor:
        """The update of the weight [out, in], in fp32."""
        return (self.up.float() @ self.down.float()) * self.factor


class LoRALinear(nn.Linear):
    """A linear layer carrying LoRAs: the same object, Parameters and state dict as before, plus its updates.

    A layer becomes one in place (its class is swapped) and turns back into a plain nn.Linear when its last LoRA
    goes. A class and not a forward hook, because torch.compile guards on a module's class but not on hooks added
    after it compiled: a hook would be silently skipped by blocks compiled before the LoRA came.
    """

    loras: nn.ModuleList  # LoRAUpdate, in load order
    original: Tensor | None  # the weight before any fusing (on the CPU), while anything is fused

    @classmethod
    def convert(cls, linear: nn.Linear) -> "LoRALinear":
        linear.__class__ = cls
        linear.loras = nn.ModuleList()
        linear.original = None
        return linear

    def revert(self) -> None:
        del self.loras, self.original
        self.__class__ = nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        for update in self.loras:
            if not update.fused:
                out = out + update(x)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Set the weight to the original plus every fused update (summed in fp32, cast once), or back to the
        original itself when nothing is fused."""
        fused = [update.delta() for update in self.loras if update.fused]
        if self.original is None:
            # The merge below makes a new tensor, so on the CPU the original needs no copy (and a memory-mapped
            # one is never written to).
            self.original = self.weight.detach().to("cpu")
        original = self.original.to(self.weight.device)
        if fused:
            self.weight.data = (original.float() + sum(fused)).to(self.weight.dtype)
        else:  # in the weight's dtype, which a model.to(dtype) since the fusing may have changed
            self.weight.data = original.to(self.weight.dtype)
            self.original = None


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """Every linear layer of the model that carries a LoRA."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_names(model: nn.Module) -> list[str]:
    """The names of the LoRAs on the model, sorted."""
    return sorted({update.name for layer in lora_layers(model) for update in layer.loras})


# ---- what the pipeline calls -----------------------------------------------------------------------------------


def load_lora(model: nn.Module, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
    """Read a LoRA file and add it to the model, unfused; -> its name (by default the file's stem)."""
    return add_lora(model, read_lora(path), scale, name or Path(path).stem, source=str(path))


def add_lora(model: nn.Module, state_dict: dict[str, Tensor], scale: float, name: str, source: str = "the LoRA") -> str:
    """Add a LoRA state dict to the model, unfused, under `name`; everything is checked before anything changes."""
    if name in lora_names(model):
        raise LoRAError(f"a LoRA named {name!r} is already loaded: unload it first, or give this one another name")
    check_scale(scale)
    layer_loras = parse_lora(state_dict, model, source)
    with all_or_nothing(model):
        for path, layer_lora in layer_loras.items():
            linear = model.get_submodule(path)
            if not isinstance(linear, LoRALinear):
                linear = LoRALinear.convert(linear)
            linear.loras.append(LoRAUpdate(name, layer_lora, scale, like=linear.weight))
    return name


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Change a loaded LoRA's scale: at once when unfused, by merging again from the original weights when fused."""
    check_loaded(model, name)
    check_scale(scale)
    with all_or_nothing(model):
        for layer in lora_layers(model):
            for update in layer.loras:
                if update.name == name:
                    update.scale = scale
                    if update.fused:
                        layer.merge()


def fuse_lora(model: nn.Module, name: str | None = None) -> None:
    """Merge one loaded LoRA (or all) into the weights; it stays loaded (its scale can still change)."""
    if name is not None:
        check_loaded(model, name)
    with all_or_nothing(model):
        for layer in lora_layers(model):
            chosen = [u for u in layer.loras if not u.fused and name in (None, u.name)]
            for update in chosen:
                update.fused = True
            if chosen:
                layer.merge()


def unload_lora(model: nn.Module, name: str | None = None) -> None:
    """Remove one LoRA (or all); with none left on a layer, its weight is the original again, bit for bit."""
    if name is not None:
        check_loaded(model, name)
    with all_or_nothing(model):
        for layer in lora_layers(model):
            removed = [i for i, update in enumerate(layer.loras) if name in (None, update.name)]
            was_fused = any(layer.loras[i].fused for i in removed)
            for i in reversed(removed):
                del layer.loras[i]
            if was_fused:
                layer.merge()
            if len(layer.loras) == 0:
                layer.revert()


@contextmanager
def all_or_nothing(model: nn.Module):
    """Put every linear layer's LoRAs, their scales and fusing, and its weight back as they were if the block stops
    partway (an out-of-memory error while merging on the GPU, Ctrl-C): otherwise the layers done would keep the
    change and the others not, a LoRA could be marked fused without being merged (a retry then skips it), or be
    removed with its update still merged into the weight. A weight whose merged updates the block changed is merged
    again from its original, so it comes back bit for bit; nothing is copied beforehand."""

    def state(layer: nn.Linear) -> tuple:
        updates = list(getattr(layer, "loras", []))
        return type(layer), updates, [(update.fused, update.scale) for update in updates]

    def merged(updates: list, settings: list) -> list:
        """What a merge writes into the weight: the fused updates, with their scales."""
        return [(update, scale) for update, (fused, scale) in zip(updates, settings) if fused]

    saved = [(layer, state(layer)) for layer in model.modules() if isinstance(layer, nn.Linear)]
    try:
        yield
    except BaseException:
        for layer, (kind, updates, settings) in saved:
            now = state(layer)
            if now == (kind, updates, settings):
                continue
            # Merge again only where the block changed what is merged: undoing a load (whose buffers may just have
            # run out of memory) must not recompute every fused weight it touched, which needs far more memory.
            remerge = merged(*now[1:]) != merged(updates, settings)
            if not isinstance(layer, LoRALinear):
                LoRALinear.convert(layer)  # the block removed its last LoRA
            layer.loras = nn.ModuleList(updates)
            for update, (fused, scale) in zip(updates, settings):
                update.fused, update.scale = fused, scale
            if remerge and (layer.original is not None or any(update.fused for update in updates)):
                layer.merge()  # the original plus what was fused before, or the original alone
            if kind is not LoRALinear:
                layer.revert()  # the block gave it its first LoRA
        raise


def check_loaded(model: nn.Module, name: str) -> None:
    loaded = lora_names(model)
    if name not in loaded:
        raise LoRAError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(loaded) or 'none'})")


def check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise LoRAError(f"a LoRA scale must be a finite number, got {scale}")
