"""Make images from a prompt with a converted Mirage checkpoint.

    python sample.py --prompt "a rusty vintage tram on a sandy beach"
    python sample.py --prompt "a fox in the snow" --num-images 4 --seed 7 --dtype bf16 --output fox.png

Unset sampling settings come from the checkpoint's config.json (28 steps and guidance 4, or 8 steps and
guidance 1 for distilled checkpoints). Every PNG carries its prompt and settings in its text metadata.
"""

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

DTYPE_NAMES = ("fp32", "bf16", "fp16")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
HOW_TO_GET_WEIGHTS = (
    "no converted checkpoint in weights/. Get one with:\n"
    "  pip install huggingface_hub\n"
    "  python convert_weights.py Photoroom/prx-512-t2i-sft weights/prx-512-t2i-sft"
)


def option(default, help, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class Options:
    """Every flag of sample.py, with its one default; argparse is built from these fields."""

    prompt: str | None = option(None, "the text to draw", required=True)
    negative_prompt: str = option("", "what to steer away from (used when guidance > 1)")
    weights: Path | None = option(None, "converted checkpoint folder (default: the only folder in weights/)")
    steps: int | None = option(None, "denoising steps (default: the checkpoint's)")
    guidance: float | None = option(None, "classifier-free guidance scale, >= 1; 1 = off (default: the checkpoint's)")
    height: int | None = option(None, "image height in pixels (default: the checkpoint's sample size)")
    width: int | None = option(None, "image width in pixels (default: the checkpoint's sample size)")
    seed: int | None = option(None, "random seed (default: a random one, printed)")
    num_images: int = option(1, "images to make")
    device: str | None = option(None, "cuda, mps or cpu (default: cuda when available)")
    dtype: str | None = option(None, "fp32, bf16 or fp16 (default: bf16 on GPUs, fp32 on CPU)", choices=DTYPE_NAMES)
    output: Path | None = option(None, "PNG path; several images get _0, _1, ... (default: numbered files in outputs/)")
    no_binning: bool = option(False, "generate at exactly --height x --width instead of the nearest trained aspect ratio")


def parse_options(argv=None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Options):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        kind = {int | None: int, float | None: float, Path | None: Path, int: int}.get(f.type, str)
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"], **extra)
    options = Options(**vars(parser.parse_args(argv)))
    check(options)
    return options


def check(options: Options) -> None:
    """Reject impossible settings before any weight is read."""
    if options.steps is not None and options.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {options.steps}")
    if options.guidance is not None and options.guidance < 1:
        raise ValueError(f"--guidance must be >= 1 (1 turns guidance off), got {options.guidance}")
    if options.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {options.num_images}")
    for name in ("height", "width"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be positive, got {value}")


def find_weights(weights: Path | None) -> Path:
    """--weights, or the only folder under weights/; with none, say how to make one."""
    if weights is not None:
        return weights
    folders = sorted(p for p in WEIGHTS_DIR.iterdir() if p.is_dir()) if WEIGHTS_DIR.is_dir() else []
    if not folders:
        raise FileNotFoundError(HOW_TO_GET_WEIGHTS)
    if len(folders) > 1:
        raise ValueError(f"weights/ holds {len(folders)} checkpoints: choose one with --weights weights/NAME")
    return folders[0]


def output_paths(output: Path | None, count: int) -> list[Path]:
    """PATH (PATH_0, PATH_1, ... for several), or the next free numbers in outputs/; never an existing file."""
    if output is None:
        folder = Path("outputs")
        taken = [int(p.stem) for p in folder.glob("*.png") if p.stem.isdigit()] if folder.is_dir() else []
        start = max(taken, default=-1) + 1
        paths = [folder / f"{start + i:05d}.png" for i in range(count)]
    elif count == 1:
        paths = [output]
    else:
        paths = [output.with_name(f"{output.stem}_{i}{output.suffix or '.png'}") for i in range(count)]
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} exists: choose another --output (sample.py never overwrites)")
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(path.name + ".probe")
        probe.touch()  # fail now, not after minutes of sampling, if the folder is not writable
        probe.unlink()
    return paths


def main(argv=None) -> None:
    options = parse_options(argv)
    import torch  # after argument parsing, so --help and bad flags answer at once

    from mirage.pipeline import MiragePipeline

    started = time.perf_counter()
    weights = find_weights(options.weights)
    paths = output_paths(options.output, options.num_images)
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
    if options.seed is None:
        print(f"seed {seed}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(options.dtype)
    pipe = MiragePipeline.from_pretrained(weights, device=options.device, dtype=dtype)
    images = pipe(
        options.prompt,
        negative_prompt=options.negative_prompt,
        height=options.height,
        width=options.width,
        num_inference_steps=options.steps,
        guidance_scale=options.guidance,
        seed=seed,
        num_images_per_prompt=options.num_images,
        use_resolution_binning=not options.no_binning,
    )
    settings = {**asdict(options), "weights": str(weights), "seed": seed, "output": None}
    for index, (image, path) in enumerate(zip(images, paths)):
        save_png(image, path, {**settings, "image_index": index})
    elapsed = time.perf_counter() - started
    print(f"wrote {', '.join(map(str, paths))} in {elapsed:.1f} s")


def save_png(image, path: Path, settings: dict) -> None:
    """A PNG whose text metadata holds the prompt and every setting that made it."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", settings["prompt"])
    info.add_text("mirage", json.dumps(settings, default=str))
    image.save(path, pnginfo=info)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, RuntimeError) as err:  # CheckpointError is a RuntimeError
        sys.exit(f"sample.py: error: {err}")
