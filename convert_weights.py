"""Convert published Mirage / PRX weights into mirage's layout.

    python convert_weights.py Photoroom/prx-512-t2i-sft weights/prx-512-t2i-sft
    python convert_weights.py --transformer model.pth --text-encoder google/t5gemma-2b-2b-ul2 \\
        --tokenizer google/t5gemma-2b-2b-ul2 --vae ae.safetensors weights/my-mirage

SRC is a folder in diffusers layout (`model_index.json`, `transformer/`, `text_encoder/`, `tokenizer/`,
`vae/`, `scheduler/`) or, with `huggingface_hub` installed, a Hub repo id. The part flags replace or
supply single components (the older Mirage layout held only the transformer and scheduler); the sampling settings
(the scheduler's shift, the sample size) come from the transformer's pipeline: the one --transformer names, else
SRC. OUT gets:
`config.json`, `transformer.safetensors`, `text_encoder.safetensors`, `vae.safetensors`, `tokenizer.model`.

Module names in mirage equal the diffusers (transformer, VAEs) and transformers (T5Gemma) checkpoint
keys, so those load as they are; the two other formats each get one rename table (the original
training codebase's in mirage/loading.py, where LoRA loading reads it too).
"""

import argparse
import glob
import json
import math
import os
import pickle
import re
import shutil
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import mirage

mirage.use_huge_pages()  # before torch is imported: it reads the setting once, at its first large tensor

INTERRUPTED = "convert_weights.py: interrupted: nothing was half-written"

try:  # importing torch takes seconds: a Ctrl-C then ends in the same one line as one during the conversion
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from mirage.configs import (
        VAE_TYPES,
        DCAEConfig,
        FluxVAEConfig,
        MirageConfig,
        SamplingConfig,
        TextEncoderConfig,
        TokenizerConfig,
        TransformerConfig,
    )
    from mirage.loading import CheckpointError, check_state_dict, read_config, read_safetensors, rename_original_key
    from mirage.pipeline import ASPECT_RATIO_BINS, COMPONENTS, component, load_tokenizer
    from mirage.precision import DTYPES, dtype_name
    from mirage.tokenizer import sentencepiece_model_from_tokenizer_json
except KeyboardInterrupt:
    if __name__ != "__main__":  # imported, by the tests say: the importer handles its own Ctrl-C
        raise
    sys.exit(INTERRUPTED)

VAE_CLASS_NAMES = {"AutoencoderKL": "flux", "AutoencoderDC": "dc-ae"}
# Distilled checkpoints ("distilled" in the name) sample in 8 steps without guidance; others take SamplingConfig's.
DISTILLED_SAMPLING = {"num_inference_steps": 8, "guidance_scale": 1.0}
# The sampling settings that a pipeline holds (`pipeline_sampling`), and the flags that set them instead.
SAMPLING_FLAGS = {"shift": "--shift", "default_sample_size": "--sample-size"}
# What the error for a damaged source file advises: converting it again would read the same damaged file.
REFETCH = "download or copy it again"

# The files a conversion reads of each part, as glob patterns for a Hub download (whose * crosses folders).
DIFFUSERS_FILES = [
    "config.json", "diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model.safetensors.index*.json"
]
PART_FILES = {
    "transformer": DIFFUSERS_FILES,
    "text_encoder": ["config.json", "model*.safetensors", "model.safetensors.index*.json"],
    "tokenizer": ["tokenizer.json", "tokenizer_config.json", "tokenizer.model"],
    "vae": DIFFUSERS_FILES,
}
# The name of each weighted part's weight files: {stem}.safetensors, {stem}.{variant}.safetensors, ...
WEIGHT_STEMS = {"transformer": "diffusion_pytorch_model", "text_encoder": "model", "vae": "diffusion_pytorch_model"}
# A pipeline's files beside its parts: the VAE type and sample size (model_index.json), the schedule.
SETTINGS_FILES = ["model_index.json", "scheduler/scheduler_config.json"]
# SRC: every part in its subfolder. A part flag: that part's subfolder of a pipeline (FLUX.1-dev's vae/, not its
# 23 GB transformer), or the same files at the root of a repo that holds only the part.
PIPELINE_FILES = [*SETTINGS_FILES, *(f"{part}/{name}" for part, names in PART_FILES.items() for name in names)]

# Black Forest Labs' `ae.safetensors` (the original LDM naming) -> diffusers AutoencoderKL, per name part.
BFL_VAE_RENAMES = {
    "down": "down_blocks",
    "up": "up_blocks",
    "block": "resnets",
    "nin_shortcut": "conv_shortcut",
    "downsample": "downsamplers.0",
    "upsample": "upsamplers.0",
    "norm_out": "conv_norm_out",
    "mid.block_1": "mid_block.resnets.0",
    "mid.block_2": "mid_block.resnets.1",
    "mid.attn_1.norm": "mid_block.attentions.0.group_norm",
    "mid.attn_1.q": "mid_block.attentions.0.to_q",
    "mid.attn_1.k": "mid_block.attentions.0.to_k",
    "mid.attn_1.v": "mid_block.attentions.0.to_v",
    "mid.attn_1.proj_out": "mid_block.attentions.0.to_out.0",
}


# ---- reading sources -------------------------------------------------------------------------


def resolve_source(spec: str, files: list[str]) -> Path:
    """A local file or folder as it is; a Hub repo id (`owner/name`) downloaded with huggingface_hub, only its
    `files` (glob patterns: a repo like FLUX.1-dev holds tens of GB that a conversion does not read)."""
    path = Path(spec)
    if path.exists():
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise CheckpointError(f"{spec} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{spec} is not a local path; to download it from the Hub, pip install huggingface_hub"
        ) from None
    try:
        return Path(snapshot_download(spec, allow_patterns=files))
    except Exception as err:  # huggingface_hub raises many types (no such repo, offline, ...); all mean the same here
        reason = first_line(err) or type(err).__name__
        raise CheckpointError(
            f"{spec} is not a local path, and downloading it from the Hub failed ({reason}): check the path or repo id"
        ) from None


def first_line(err: Exception) -> str:
    """The first line of an error's message ("" for none): libraries' errors can run to paragraphs."""
    return next(iter(str(err).strip().splitlines()), "")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object: is it the right file?")
    return data


@contextmanager
def reading(path: Path):
    """Report a malformed entry of the JSON file `path` (a wrong type, a missing key) as a CheckpointError."""
    try:
        yield
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
        detail = f"no {err} entry" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"{path} is not a config mirage can read ({detail})") from None


def read_weights(path: Path, stem: str = "", variant: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a file, or of a folder's `{stem}.safetensors` (sharded with an index json, or not). A variant
    (diffusers' and transformers' name for, say, the fp16 copy of a model) is read where the folder has it:
    `{stem}.{variant}.safetensors` or `{stem}.safetensors.index.{variant}.json`, else its plain files (a pipeline's
    fp16 copy may cover only some parts; `check_variant` has refused a variant that no folder has)."""
    if path.is_file():
        return read_weights_file(path)
    suffixes = ([f".{variant}"] if variant else []) + [""]
    for suffix in suffixes:
        index = path / f"{stem}.safetensors.index{suffix}.json"
        if index.is_file():
            return read_shards(index)
        if (path / f"{stem}{suffix}.safetensors").is_file():
            return read_weights_file(path / f"{stem}{suffix}.safetensors")
    files = " nor ".join(f"{stem}{suffix}.safetensors" for suffix in suffixes)
    found = variants(path, stem)
    hint = f"its variants: {', '.join(found)} (--variant NAME)" if found else "is it the right folder?"
    raise CheckpointError(f"{path} holds no {files} (nor a sharded index): {hint}")


def read_shards(index: Path) -> dict[str, torch.Tensor]:
    """The tensors of every shard that a sharded checkpoint's index json lists."""
    with reading(index):
        shards = [index.parent / shard for shard in sorted(set(read_json(index)["weight_map"].values()))]
    missing = [shard for shard in shards if not shard.is_file()]
    if missing:
        raise CheckpointError(f"{missing[0]}, listed in {index.name}, is missing: download the checkpoint again")
    return {k: v for shard in shards for k, v in read_weights_file(shard).items()}


def variants(folder: Path, stem: str) -> list[str]:
    """The variants of `stem` in a folder: fp16 for model.fp16.safetensors, model.fp16-00001-of-00002.safetensors
    or model.safetensors.index.fp16.json."""
    s = re.escape(stem)
    pattern = rf"{s}\.(\w+)(?:-\d+-of-\d+)?\.safetensors|{s}\.safetensors\.index\.(\w+)\.json"
    matches = (re.fullmatch(pattern, p.name) for p in folder.iterdir())
    return sorted({m[1] or m[2] for m in matches if m})


def check_variant(variant: str | None, parts: dict[str, Path]) -> None:
    """Refuse a --variant that no part's folder has before reading anything: it is a typo, and `read_weights`
    would silently read the plain files."""
    if variant is None:
        return
    folders = [(path, WEIGHT_STEMS[name]) for name, path in parts.items() if name in WEIGHT_STEMS and path.is_dir()]
    found = sorted({name for path, stem in folders for name in variants(path, stem)})
    if variant not in found:
        hint = f"the variants found: {', '.join(found)}" if found else "the sources have none: drop --variant"
        raise CheckpointError(f"no source file is of --variant {variant}; {hint}")


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a torch pickle read safely (weights only), unwrapped from model/state_dict. Every
    source weight file is read here."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, remedy=REFETCH)
    try:
        # torch's zip format is memory-mapped; its older one (before torch 1.6) cannot be, and is read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:  # torch's paragraph on this suggests unsafe loading: say what it means instead
        raise CheckpointError(f"{path} is not a torch pickle of plain tensors (safe loading refused it): {REFETCH}, "
                              "or save its state dict with safetensors") from None  # fmt: skip
    except Exception as err:  # torch raises many types for a damaged file; all mean the same to the user
        detail = f"{type(err).__name__}: {first_line(err)}" if first_line(err) else type(err).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({detail}): {REFETCH}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors: pass the transformer's weights file")
    return state


def read_transformer(path: Path, latent_channels: int, variant: str | None) -> tuple[TransformerConfig, dict]:
    """A diffusers transformer folder, or an original-codebase state dict file (config inferred)."""
    if path.is_dir():
        with reading(path / "config.json"):
            config = TransformerConfig.from_diffusers(read_json(path / "config.json"))
        return config, read_weights(path, WEIGHT_STEMS["transformer"], variant)
    weights = read_weights_file(path)
    if not any(k.startswith("blocks.0.attention.") for k in weights):
        weights = {rename_original_key(k): v for k, v in weights.items()}
    return infer_transformer_config(weights, latent_channels), weights


def infer_transformer_config(weights: dict, latent_channels: int) -> TransformerConfig:
    """An original-codebase file has no config: read the hyper-parameters off the tensor shapes."""
    try:
        hidden, patch_dim = weights["img_in.weight"].shape
        head_dim = weights["blocks.0.attention.norm_q.weight"].shape[0]
        context_in_dim = weights["txt_in.weight"].shape[1]
        mlp_hidden = weights["blocks.0.gate_proj.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"the transformer state dict lacks {err}: is it a PRX transformer?") from None
    patch_size = round((patch_dim / latent_channels) ** 0.5)
    if patch_size**2 * latent_channels != patch_dim:
        raise CheckpointError(
            f"img_in takes {patch_dim} features, which is no square patch of {latent_channels} latent channels: "
            "wrong --vae or --vae-type?"
        )
    depth = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
    mlp_ratio = mlp_hidden / hidden
    while int(hidden * mlp_ratio) < mlp_hidden:  # the model's width is int(hidden * ratio): m / h may round below m
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    return replace(
        TransformerConfig(),
        in_channels=latent_channels,
        patch_size=patch_size,
        context_in_dim=context_in_dim,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        mlp_ratio=mlp_ratio,
        axes_dim=(head_dim // 2, head_dim // 2),
    )


def read_text_encoder(path: Path, variant: str | None) -> tuple[TextEncoderConfig, dict]:
    """A T5Gemma encoder folder, or a full encoder-decoder one: keep the encoder, drop the rest."""
    with reading(path / "config.json"):
        config = TextEncoderConfig.from_transformers(read_json(path / "config.json"))
    weights = read_weights(path, WEIGHT_STEMS["text_encoder"], variant)
    prefix = next((p for p in ("model.encoder.", "encoder.") if any(k.startswith(p) for k in weights)), "")
    return config, {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def read_tokenizer(path: Path) -> tuple[TokenizerConfig, bytes]:
    """A tokenizer folder: its SentencePiece model, or one rebuilt from `tokenizer.json` (transformers 5)."""
    settings = path / "tokenizer_config.json"
    # transformers 5 keeps BOS/EOS in tokenizer.json's template and drops the flags from the config.
    tokenizer_json = read_json(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
    with reading(settings if settings.is_file() else path / "tokenizer.json"):
        config = TokenizerConfig.from_tokenizer_config(read_json(settings) if settings.is_file() else {}, tokenizer_json)
    if (path / "tokenizer.model").is_file():
        return config, (path / "tokenizer.model").read_bytes()
    if tokenizer_json is None:
        raise CheckpointError(f"{path} has neither tokenizer.model nor tokenizer.json: pass --tokenizer FOLDER")
    try:
        return config, sentencepiece_model_from_tokenizer_json(tokenizer_json)
    except ValueError as err:
        raise CheckpointError(f"{path}/tokenizer.json: {err}") from None


def read_vae(
    path: Path, vae_type: str | None, variant: str | None, said_by: str = "--vae-type"
) -> tuple[str, FluxVAEConfig | DCAEConfig, dict]:
    """A diffusers AutoencoderKL / AutoencoderDC folder, or Black Forest Labs' single-file `ae.safetensors`; if
    `vae_type` is given (by `said_by`), it must be that."""
    if path.is_file():
        if vae_type not in (None, "flux"):
            raise CheckpointError(f"{path} is a single-file VAE, which mirage reads only for the Flux VAE")
        config = FluxVAEConfig()
        levels = len(config.block_out_channels)
        weights = {rename_bfl_vae_key(k, levels): v for k, v in read_weights_file(path).items()}
        return "flux", config, squeeze_attention_convs(weights)
    raw = read_json(path / "config.json")
    class_name = str(raw.get("_class_name"))
    found = VAE_CLASS_NAMES.get(class_name)
    if found is None:
        raise CheckpointError(
            f"{path}/config.json describes a {class_name!r}, not a VAE mirage knows ({', '.join(VAE_CLASS_NAMES)})"
        )
    if vae_type is not None and vae_type != found:
        raise CheckpointError(f"{path} holds an {class_name} ({found}), but {said_by} says {vae_type}")
    with reading(path / "config.json"):
        config = FluxVAEConfig.from_diffusers(raw) if found == "flux" else DCAEConfig.from_diffusers(raw)
    return found, config, read_weights(path, WEIGHT_STEMS["vae"], variant)


def rename_bfl_vae_key(key: str, levels: int) -> str:
    """BFL numbers `decoder.up.{i}` by resolution level, 0 the full-resolution one (run last); diffusers numbers
    `up_blocks` in the order they run, lowest resolution first: up.i is up_blocks.(levels - 1 - i)."""
    match = re.fullmatch(r"decoder\.up\.(\d+)\.(.+)", key)
    if match:
        key = f"decoder.up.{levels - 1 - int(match[1])}.{match[2]}"
    for old, new in sorted(BFL_VAE_RENAMES.items(), key=lambda kv: -len(kv[0])):
        key = re.sub(rf"(?<=\.){re.escape(old)}(?=\.)", new, key)
    return key


def squeeze_attention_convs(weights: dict) -> dict:
    """The LDM attention uses 1x1 convolutions [C, C, 1, 1]; diffusers uses linear layers [C, C]."""
    return {
        k: v[:, :, 0, 0] if ".attentions." in k and v.ndim == 4 else v
        for k, v in weights.items()
    }


def read_index(path: Path) -> tuple[str | None, int | None]:
    """model_index.json's VAE type and default_sample_size, where it names them."""
    index = read_json(path)
    with reading(path):
        vae_class = (index.get("vae") or [None, None])[1]  # ["diffusers", "AutoencoderKL"]
        sample_size = index.get("default_sample_size")
        if not isinstance(sample_size, int | None):
            raise TypeError(f"default_sample_size must be an integer, got {sample_size!r}")
    return VAE_CLASS_NAMES.get(str(vae_class)), sample_size


def read_scheduler(path: Path) -> dict:
    """shift and num_train_timesteps of a FlowMatchEulerDiscreteScheduler; other options are not supported."""
    raw = read_json(path / "scheduler_config.json")
    unsupported = {
        k: raw[k]
        for k in ("use_dynamic_shifting", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                  "use_beta_sigmas", "stochastic_sampling", "shift_terminal")
        if raw.get(k)
    }  # fmt: skip
    if raw.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler" or unsupported:
        raise CheckpointError(f"{path} sets scheduler options mirage does not implement: {unsupported or raw['_class_name']}")
    with reading(path / "scheduler_config.json"):
        return {"shift": float(raw.get("shift", 1.0)), "num_train_timesteps": int(raw.get("num_train_timesteps", 1000))}


# ---- assembling a checkpoint -----------------------------------------------------------------


def gather(args) -> tuple[MirageConfig, dict[str, dict], bytes, list[str]]:
    """Read every component from SRC and the part flags: -> config, {component: weights}, tokenizer model, and the
    sampling settings that took mirage's defaults (`sampling_settings`)."""
    src = resolve_source(args.src, PIPELINE_FILES) if args.src else None
    if src and not (src / "model_index.json").is_file():
        raise CheckpointError(f"{src} has no model_index.json: pass a diffusers-layout folder, or the part flags")
    found = {name: find_part(getattr(args, name), name, src) for name in PART_FILES}  # name: (path, pipeline)
    parts = {name: path for name, (path, _) in found.items()}
    check_variant(args.variant, parts)
    sampling, defaulted = sampling_settings(args, found["transformer"][1] or src)  # both before reading weights

    said_by = "--vae-type" if args.vae_type else "model_index.json"
    index_vae_type = read_index(src / "model_index.json")[0] if src else None
    vae_type = args.vae_type or (None if args.vae else index_vae_type)  # a --vae of its own is not SRC's
    vae_type, vae_config, vae_weights = read_vae(parts["vae"], vae_type, args.variant, said_by)
    transformer_config, transformer_weights = read_transformer(
        parts["transformer"], vae_config.latent_channels, args.variant
    )
    text_config, text_weights = read_text_encoder(parts["text_encoder"], args.variant)
    tokenizer_config, tokenizer_model = read_tokenizer(parts["tokenizer"])
    config = MirageConfig(transformer_config, text_config, tokenizer_config, vae_type, vae_config, sampling)
    load_tokenizer(tokenizer_model, config, source=f"the tokenizer in {parts['tokenizer']}")
    weights = {"transformer": transformer_weights, "text_encoder": text_weights, "vae": vae_weights}
    return config, weights, tokenizer_model, defaulted


def find_part(spec: str | None, name: str, src: Path | None) -> tuple[Path, Path | None]:
    """Where part `name` is read, and the pipeline folder it belongs to (None for a bare folder or file): the part
    flag's `spec` (that part's subfolder if it names a pipeline; only the transformer's brings the sampling settings
    along), else SRC's subfolder."""
    if spec is None:
        if src is None or not (src / name).exists():
            raise CheckpointError(f"no {name} found: pass --{name.replace('_', '-')} PATH")
        return src / name, src
    beside = SETTINGS_FILES if name == "transformer" else ["model_index.json"]
    path = resolve_source(spec, [*beside, *PART_FILES[name], *(f"{name}/{file}" for file in PART_FILES[name])])
    if (path / "model_index.json").is_file() and (path / name).is_dir():
        return path / name, path
    return path, None


def sampling_settings(args, pipeline: Path | None) -> tuple[SamplingConfig, list[str]]:
    """The flags' sampling settings, else a distilled checkpoint's (by its name), else those of `pipeline` (the one
    the transformer came from), else SamplingConfig's. -> the config, and the keys of SAMPLING_FLAGS left at
    SamplingConfig's defaults, which a checkpoint's pipeline would have set."""
    distilled = DISTILLED_SAMPLING if distilled_name(args) else {}
    settings = (pipeline_sampling(pipeline) if pipeline else {}) | distilled | sampling_flags(args)
    return SamplingConfig(**settings), [key for key in SAMPLING_FLAGS if key not in settings]


def pipeline_sampling(pipeline: Path) -> dict:
    """The sampling settings a pipeline folder holds, where it has them: its scheduler's shift and timesteps, and
    model_index.json's default_sample_size."""
    _, sample_size = read_index(pipeline / "model_index.json")
    scheduler = read_scheduler(pipeline / "scheduler") if (pipeline / "scheduler").is_dir() else {}
    return scheduler | ({"default_sample_size": sample_size} if sample_size is not None else {})


def sampling_flags(args) -> dict:
    """The sampling settings given as flags."""
    given = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "shift": args.shift,
             "default_sample_size": args.sample_size}  # fmt: skip
    return {key: value for key, value in given.items() if value is not None}


def distilled_name(args) -> str | None:
    """The name that marks a distilled checkpoint ("distilled" in it, as Photoroom names them): SRC's, or the
    --transformer's (its folder's, if that is called transformer). Only these names: not the folders above."""
    for spec in filter(None, (args.src, args.transformer)):
        path = Path(spec).resolve() if Path(spec).exists() else Path(spec)  # "." has a name once resolved
        path = path.parent if path.name == "transformer" else path
        if path.parent.name == "snapshots":  # Hugging Face's cache: models--OWNER--NAME/snapshots/COMMIT
            path = Path(path.parent.parent.name.split("--")[-1])
        if "distilled" in path.name:
            return path.name
    return None


def check_weights(config: MirageConfig, weights: dict[str, dict]) -> None:
    """Every tensor against the shapes the config implies (models built on the meta device: no memory)."""
    for name in COMPONENTS:
        model_class, model_config = component(config, name)
        with torch.device("meta"):
            model = model_class(model_config)
        check_state_dict(model, weights[name], f"the {name} state dict",
                         remedy="check that its weights and config.json come from one model, or download them again")


def check_out(out: Path, force: bool) -> None:
    """OUT must be new, or with --force a converted checkpoint or an empty folder: never a folder of other files."""
    if not out.exists():
        return
    if not (out.is_dir() and not any(out.iterdir())):
        try:
            read_config(out)
        except CheckpointError:  # checked first: advising --force here would only lead to this refusal
            raise CheckpointError(
                f"{out} is not a converted checkpoint, and --force replaces only those: choose another OUT"
            ) from None
    if not force:
        raise CheckpointError(f"{out} already exists: pass --force to replace it")


def check_sources(args, out: Path) -> None:
    """A source inside OUT would be deleted when --force replaces OUT: refuse before reading anything."""
    for spec in filter(None, (args.src, args.transformer, args.text_encoder, args.tokenizer, args.vae)):
        if out.exists() and Path(spec).exists() and Path(spec).resolve().is_relative_to(out.resolve()):
            raise CheckpointError(f"{spec} lies inside {out}, which the conversion would replace: choose another OUT")


def write_checkpoint(out: Path, config: MirageConfig, weights: dict, tokenizer_model: bytes, dtype, force: bool):
    """Write into a temporary folder beside OUT, then swap it in: a failure leaves nothing half-written."""
    out = out.resolve()  # "." or "a/.." has no name to put a folder beside
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.parent / f".{out.name}.{kind}-{os.getpid()}" for kind in ("tmp", "old"))
    try:
        tmp.mkdir()
        for name, state in weights.items():
            state = {k: cast(v, dtype).contiguous() for k, v in state.items()}
            check_weights_finite(name, weights[name], state)
            save_file(state, tmp / f"{name}.safetensors", metadata={"format": "pt"})
            os.chmod(tmp / f"{name}.safetensors", new_file_mode())
        (tmp / "tokenizer.model").write_bytes(tokenizer_model)
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        swap_in(tmp, out, old)
    except SafetensorError as err:  # how safetensors reports a failed write (disk full, file too large)
        raise OSError(f"writing {out} failed ({err}): free some disk space, or choose another OUT") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def new_file_mode() -> int:
    """The mode a new file gets under the current umask (0o644 under the usual 022). safetensors makes its files
    0o600, which the other users of a shared checkpoint could not read."""
    umask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(umask)
    return 0o666 & ~umask


def swap_in(new: Path, out: Path, old: Path) -> None:
    """Rename `new` to `out`. An existing `out` is renamed to `old` first, back if the swap fails, and deleted last:
    `out` is the old checkpoint or the new one, never a mix, and missing only between the two renames (a kill
    there leaves `old`, which the next conversion to `out` puts back: `remove_leftovers`)."""
    replacing = out.exists()
    try:
        if replacing:
            out.rename(old)
        new.rename(out)
    except BaseException:  # Ctrl-C included
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    if replacing:
        try:
            shutil.rmtree(old)
        except OSError as err:
            print(f"convert_weights.py: warning: could not delete the old checkpoint, now {old} ({err})",
                  file=sys.stderr)  # fmt: skip


def remove_leftovers(out: Path) -> None:
    """Clear what conversions to OUT killed outright (SIGKILL, power loss) left beside it, those of processes gone
    or of this process's PID (a container's PIDs repeat from one run to the next): their temporary folders are
    deleted; an old checkpoint renamed aside goes back to OUT if OUT is missing (see `swap_in`), else deleted."""
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        kind, _, pid = path.name.removeprefix(f".{out.name}.").partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or (int(pid) != os.getpid() and running(int(pid))):
            continue
        if kind == "old" and not out.exists() and (path / "config.json").is_file():
            path.rename(out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def running(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 asks without sending; Windows has no such check: assume it does)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def check_weights_finite(name: str, source: dict, stored: dict) -> None:
    """Refuse a weight that holds inf or NaN once stored, before anything is written: run, it would make every image
    NaN, found only after a whole generation. Either the source holds them, or --dtype fp16 overflowed."""
    for key, tensor in stored.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            if not torch.isfinite(source[key]).all():
                raise CheckpointError(f"the {name} weight {key} holds inf or NaN in the source: {REFETCH}")
            largest = source[key].abs().max().item()
            raise CheckpointError(f"the {name} weight {key} holds values up to {largest:.3g}, beyond "
                                  f"{dtype_name(tensor.dtype)}'s range: convert with another --dtype")  # fmt: skip


def describe(config: MirageConfig, weights: dict, dtype, distilled: str | None, defaulted: list[str]) -> list[str]:
    """One line per component: what it is, how many parameters, which dtype is stored; the sampling settings, for a
    distilled checkpoint the name that said so, and the `defaulted` settings (SAMPLING_FLAGS' keys) with their flags:
    a guess where the transformer came without its pipeline."""

    def summary(state):
        count = sum(v.numel() for v in state.values())
        stored = dtype or next(v.dtype for v in state.values() if v.is_floating_point())
        size = f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"
        return f"{size} parameters, {dtype_name(stored)}"

    t = config.transformer
    return [
        f"transformer:  PRX, hidden {t.hidden_size}, depth {t.depth}, {t.num_heads} heads, patch {t.patch_size}; "
        + summary(weights["transformer"]),
        f"text encoder: T5Gemma encoder, {config.text_encoder.num_hidden_layers} layers; " + summary(weights["text_encoder"]),
        f"vae:          {'Flux VAE' if config.vae_type == 'flux' else 'DC-AE'} "
        f"({config.vae.spatial_compression}x, {config.vae.latent_channels} channels); "
        + summary(weights["vae"]),
        f"sampling:     {config.sampling.num_inference_steps} steps, guidance {config.sampling.guidance_scale}, "
        f"shift {config.sampling.shift}, {config.sampling.default_sample_size} px"
        + (f" (distilled, by the name {distilled}: --steps and --guidance set others)" if distilled else "")
        + (defaults_note([SAMPLING_FLAGS[key] for key in defaulted]) if defaulted else ""),
    ]


def defaults_note(flags: list[str]) -> str:
    """' (mirage's default shift: the transformer's source sets none; pass --shift to override)', for any of
    SAMPLING_FLAGS."""
    settings = " and ".join(flag.removeprefix("--").replace("-", " ") for flag in flags)
    return f" (mirage's default {settings}: the transformer's source sets none; pass {' and '.join(flags)} to override)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = mirage.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", nargs="?", help="diffusers-layout folder or Hub repo id (optional with the part flags)")
    parser.add_argument("out", help="output folder, e.g. weights/prx-512-t2i-sft")
    parser.add_argument("--transformer", help="diffusers transformer folder, or an original-codebase .pth/.pt/.safetensors")
    parser.add_argument("--text-encoder", help="T5Gemma encoder folder, or the full google/t5gemma-2b-2b-ul2")
    parser.add_argument("--tokenizer", help="tokenizer folder (tokenizer.model, or tokenizer.json)")
    parser.add_argument("--vae", help="diffusers AutoencoderKL/AutoencoderDC folder, or Black Forest Labs' ae.safetensors")
    parser.add_argument("--vae-type", choices=VAE_TYPES, help="when nothing else says which VAE it is")
    parser.add_argument("--variant", help="read the variant files of the folders (e.g. fp16: model.fp16.safetensors)")
    default, distilled = SamplingConfig(), SamplingConfig(**DISTILLED_SAMPLING)
    parser.add_argument("--steps", type=int, help=f"recommended steps (default: {default.num_inference_steps}, "
                        f"or {distilled.num_inference_steps} for distilled checkpoints)")  # fmt: skip
    parser.add_argument("--guidance", type=float, help=f"recommended guidance (default: {default.guidance_scale}, "
                        f"or {distilled.guidance_scale} for distilled)")  # fmt: skip
    pipeline = "that of the transformer's pipeline (the one --transformer names, else SRC)"
    parser.add_argument("--shift", type=float, help=f"the schedule's shift (default: {pipeline}, else {default.shift})")
    parser.add_argument("--sample-size", type=int, choices=sorted(ASPECT_RATIO_BINS), help=f"training resolution "
                        f"(default: {pipeline}, else {default.default_sample_size})")  # fmt: skip
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="stored dtype (default: keep the source's)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_intermixed_args(argv)  # SRC is optional: let flags sit between SRC and OUT
    if args.src is None and not any((args.transformer, args.text_encoder, args.tokenizer, args.vae)):
        parser.error(f"give SRC and OUT (only {args.out} was given), or OUT and the part flags")
    bad = {"--steps must be at least 1": args.steps is not None and args.steps < 1,
           "--guidance must be a finite number >= 1": args.guidance is not None and not 1 <= args.guidance < math.inf,
           "--shift must be a finite number > 0": args.shift is not None and not 0 < args.shift < math.inf}  # fmt: skip
    for message in (message for message, wrong in bad.items() if wrong):
        parser.error(message)  # before anything is read
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = DTYPES.get(args.dtype)
    out = Path(args.out)
    remove_leftovers(out.resolve())  # first: it may put back an OUT that check_out must see
    check_out(out, args.force)  # fail before reading gigabytes
    mirage.check_writable(out.resolve().parent, "OUT")  # write_checkpoint's: "." is written from its parent
    check_sources(args, out)
    config, weights, tokenizer_model, defaulted = gather(args)
    check_weights(config, weights)
    write_checkpoint(out, config, weights, tokenizer_model, dtype, args.force)
    print("\n".join(describe(config, weights, dtype, distilled_name(args), defaulted)))
    print(f"wrote {out}")


if __name__ == "__main__":
    mirage.stop_on_signals()
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)
    except MemoryError:
        sys.exit("convert_weights.py: error: out of memory: close other programs, or convert on a larger machine")
    except (ValueError, OSError, RuntimeError) as err:  # CheckpointError is a RuntimeError, as is torch's out of memory
        sys.exit(f"convert_weights.py: error: {err}")
