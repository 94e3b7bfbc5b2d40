"""Make images from a prompt with a converted Mirage checkpoint.

    python sample.py --prompt "a rusty vintage tram on a sandy beach"
    python sample.py --prompt "a fox in the snow" --num-images 4 --seed 7 --dtype bf16 --output fox.png
    python sample.py --prompts-file prompts.jsonl --outdir grid --batch-size 4 --save-trajectory
    torchrun --nproc-per-node 8 sample.py --prompts-file prompts.txt --outdir grid

A prompts file has one prompt per line, or one JSON object per line with "prompt" and any of "negative_prompt",
"seed", "height", "width", "steps", "guidance", "name" (see mirage/jobs.py). Item i gets seed --seed + i and
the file NNNNN-slug.png in --outdir, listed in its manifest.jsonl; re-running the command skips finished items.

Unset sampling settings come from the checkpoint's config.json (28 steps and guidance 5, or 8 steps and
guidance 1 for distilled checkpoints). Every PNG carries its prompt and settings in its text metadata.
"""

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mirage

mirage.use_huge_pages()  # before anything imports torch

DTYPE_NAMES = ("fp32", "bf16", "fp16")  # mirage.precision.DTYPES' keys, spelled out: --help answers before torch loads
# Where a checkpoint is looked for without --weights: weights/ where you are, then the one beside sample.py.
WEIGHTS_DIRS = (Path("weights"), Path(__file__).resolve().parent / "weights")
HOW_TO_GET_WEIGHTS = (
    "no converted checkpoint in weights/ (looked in {}). Get one with:\n"
    "  pip install huggingface_hub\n"
    "  python convert_weights.py Photoroom/prx-512-t2i-sft weights/prx-512-t2i-sft"
)


def option(default, help, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class Options:
    """Every flag of sample.py, with its one default; argparse is built from these fields."""

    prompt: str | None = option(None, "the text to draw (or --prompts-file)")
    negative_prompt: str = option("", "what to steer away from (used when guidance > 1)")
    weights: Path | None = option(None, "converted checkpoint folder (default: the only one in weights/)")
    steps: int | None = option(None, "denoising steps (default: the checkpoint's)")
    guidance: float | None = option(None, "classifier-free guidance scale, >= 1; 1 = off (default: the checkpoint's)")
    height: int | None = option(None, "image height in pixels (default: the checkpoint's sample size)")
    width: int | None = option(None, "image width in pixels (default: the checkpoint's sample size)")
    seed: int | None = option(None, "random seed (default: a random one, printed; --prompts-file: 0, item i uses SEED+i)")
    num_images: int = option(1, "images to make")
    device: str | None = option(None, "cuda, mps or cpu (default: cuda, else mps, else cpu)")
    dtype: str | None = option(None, "fp32, bf16 or fp16 (default: bf16 on GPUs, fp32 on CPU)", choices=DTYPE_NAMES)
    output: Path | None = option(None, "PNG path; several images get _0, _1, ... (default: numbered files in outputs/)")
    no_binning: bool = option(False, "generate at exactly --height x --width instead of the nearest trained aspect ratio")
    prompts_file: Path | None = option(None, "a file of prompts: one per line, or JSON Lines with per-item settings")
    outdir: Path | None = option(None, "folder for --prompts-file images and manifest.jsonl (default: outputs/NAME)")
    batch_size: int = option(1, "--prompts-file items per forward pass (items of the same size and settings)")
    save_trajectory: bool = option(False, "also write a strip of the predicted clean image at a few steps")
    offload: str | None = option(
        None, "keep weights in CPU memory: 'model' moves each model to the GPU while it runs, 'sequential' each part",
        choices=("model", "sequential"),
    )  # fmt: skip
    compile: bool = option(False, "torch.compile the transformer, text encoder and VAE (slow first call, faster after)")
    cuda_graph: bool = option(False, "replay each denoising step as a CUDA graph (CUDA only; fewer kernel launches)")
    lora: list[str] | None = option(
        None, "a LoRA safetensors file to apply, with its scale (default 1); repeat for several",
        action="append", metavar="PATH[:SCALE]",
    )  # fmt: skip


def parse_options(argv=None) -> Options:
    parser = mirage.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    if (options.prompt is None) == (options.prompts_file is None):
        raise ValueError("give either --prompt or --prompts-file")
    if options.prompts_file is not None and (options.output is not None or options.num_images != 1):
        raise ValueError("--output and --num-images go with --prompt: a prompts file makes one image per line")
    if options.prompts_file is None and (options.outdir is not None or options.batch_size != 1):
        raise ValueError("--outdir and --batch-size go with --prompts-file (--num-images batches one --prompt)")
    # every process would make the same images; WORLD_SIZE is read here, not by mirage.jobs.World, which imports
    # torch: bad flags are answered at once
    if options.prompt is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--prompt runs in one process: with torchrun, give --prompts-file (one line per image)")
    if options.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.steps is not None and options.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {options.steps}")
    if options.guidance is not None and not 1 <= options.guidance < math.inf:
        raise ValueError(f"--guidance must be a number >= 1 (1 turns guidance off), got {options.guidance}")
    if options.seed is not None and options.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {options.seed}")
    if options.output is not None and options.output.suffix.lower() != ".png":
        raise ValueError(f"--output {options.output}: sample.py writes PNG files, so the name must end in .png")
    for flag, text in (("--prompt", options.prompt or ""), ("--negative-prompt", options.negative_prompt)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes of another encoding, which Python keeps as lone surrogates
            raise ValueError(f"{flag} holds bytes that are not UTF-8: pass it in UTF-8") from None
    if options.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {options.num_images}")
    for name in ("height", "width"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be positive, got {value}")
    paths = []
    for spec in options.lora or []:
        path, scale = lora_spec(spec)
        if not path.is_file() or not math.isfinite(scale):
            raise ValueError(f"--lora {spec}: expected PATH[:SCALE], an existing file and a finite scale")
        if path.resolve() in paths:
            raise ValueError(f"--lora {path} is given twice: give each file once, with the scale it should have")
        paths.append(path.resolve())


def lora_spec(spec: str) -> tuple[Path, float]:
    """--lora PATH[:SCALE] -> (path, scale); without a number after its last colon, the whole text is the path."""
    head, colon, tail = spec.rpartition(":")
    try:
        return (Path(head), float(tail)) if colon else (Path(spec), 1.0)
    except ValueError:
        return Path(spec), 1.0


def find_weights(weights: Path | None) -> Path:
    """--weights, or the only checkpoint in the first weights/ folder that has any; with none, say how to make one."""
    if weights is not None:
        return weights
    folders = list(dict.fromkeys(path.absolute() for path in WEIGHTS_DIRS))  # once each, in order
    for folder in folders:
        found = folder.iterdir() if folder.is_dir() else []
        checkpoints = sorted(p for p in found if (p / "config.json").is_file() and not p.name.startswith("."))
        if len(checkpoints) > 1:  # (a hidden folder is a conversion's .NAME.tmp-PID)
            raise ValueError(f"{folder} holds {len(checkpoints)} checkpoints: choose one with --weights {folder}/NAME")
        if checkpoints:
            return checkpoints[0]
    raise FileNotFoundError(HOW_TO_GET_WEIGHTS.format(" and ".join(map(str, folders))))


def output_paths(output: Path | None, count: int, trajectory: bool = False) -> list[Path]:
    """PATH (PATH_0, PATH_1, ... for several), or the next free numbers in outputs/, then with `trajectory` a
    NAME.trajectory.png for each; never an existing file."""
    if output is None:
        folder = Path("outputs")
        numbers = [p.name.split(".")[0] for p in folder.iterdir()] if folder.is_dir() else []  # NNNNN.png, its strip
        start = max((int(n) for n in numbers if n.isdigit()), default=-1) + 1
        paths = [folder / f"{start + i:05d}.png" for i in range(count)]
    elif count == 1:
        paths = [output]
    else:
        paths = [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]
    if trajectory:
        paths += [path.with_suffix(".trajectory.png") for path in paths]
    for path in paths:
        if path.exists() or path.is_symlink():  # a link to nothing is a name taken too
            raise FileExistsError(f"{path} exists: choose another --output (sample.py never overwrites)")
    for folder in {path.parent for path in paths}:
        mirage.check_writable(folder, "--output")
    return paths


def claim(paths: list[Path], options: Options) -> list[Path]:
    """Take the output names for good just before writing: each is created empty, only if no file has that name
    (atomically), so that a run started meanwhile into the same folder can take none of them. Default names move
    on to the next free numbers; an --output taken meanwhile is an error."""
    while True:
        made = []
        try:
            for path in paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.open("xb").close()
                made.append(path)
            return paths
        except BaseException as err:  # a name taken meanwhile, a folder that refuses, Ctrl-C: no empty file stays
            for made_path in made:
                made_path.unlink()
            if not isinstance(err, FileExistsError):
                raise
            if options.output is not None:
                taken = f"{path} was written meanwhile by something else"
                raise FileExistsError(f"{taken}: choose another --output") from None
            paths = output_paths(None, options.num_images, options.save_trajectory)


def main(argv=None) -> None:
    options = parse_options(argv)
    started = time.perf_counter()
    weights = find_weights(options.weights)
    if options.prompts_file is not None:
        return make_many(options, weights, started)
    from mirage.jobs import Trajectory, write_png  # after argument parsing: --help and bad flags answer at once

    paths = output_paths(options.output, options.num_images, options.save_trajectory)
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
    pipe = open_pipeline(options, weights, options.device)
    used = sampled(options, pipe.config)  # the flags', else the checkpoint's: what runs is what gets recorded
    note_unused_negative(options, used["guidance"])
    add_loras(pipe, options)
    if options.seed is None:
        print(f"seed {seed}")  # once the pipeline is there: a refused run prints nothing but its error
    trajectory = Trajectory() if options.save_trajectory else None
    images = pipe(
        options.prompt,
        negative_prompt=options.negative_prompt,
        height=used["height"],
        width=used["width"],
        num_inference_steps=used["steps"],
        guidance_scale=used["guidance"],
        seed=seed,
        num_images_per_prompt=options.num_images,
        use_resolution_binning=not options.no_binning,
        callback=trajectory,
    )
    # --output is left out: it is each file's own name (_0, _1 ... for several), and a Path is no JSON
    settings = {**run_settings(options, weights, pipe), "seed": seed, "output": None, **used}
    strips = trajectory.strips(pipe, images[0].height, images[0].width) if trajectory else []
    paths = claim(paths, options)
    try:
        for index, (picture, path) in enumerate(zip(images + strips, paths)):  # the images, then their strips
            write_png(picture, path, {**settings, "image_index": index % len(images)})
    except BaseException:  # Ctrl-C, a full disk: no empty file is left under a claimed name
        for path in paths:
            if path.exists() and path.stat().st_size == 0:
                path.unlink()
        raise
    elapsed = time.perf_counter() - started
    print(f"wrote {', '.join(map(str, paths))} in {elapsed:.1f} s")


def make_many(options: Options, weights: Path, started: float) -> None:
    """--prompts-file: make every item not yet in --outdir, shared among the processes torchrun started."""
    from mirage import jobs
    from mirage.loading import read_config

    config = read_config(weights)
    seed = 0 if options.seed is None else options.seed
    defaults = jobs.Defaults(negative_prompt=options.negative_prompt, seed=seed, **sampled(options, config))
    note_unused_negative(options, defaults.guidance)
    items = jobs.read_prompts(options.prompts_file, defaults)  # a bad line stops us before any weight is read
    if options.no_binning:  # the flags' size is checked: a size that is not a multiple is the line's own
        jobs.check_sizes(items, config.pixel_multiple, options.prompts_file)
    outdir = options.outdir or Path("outputs") / options.prompts_file.stem
    mirage.check_writable(outdir, "--outdir")
    world = jobs.World.from_env()
    device = world.device(options.device)
    world.start(device)
    try:
        pipe = open_pipeline(options, weights, device)
        run = run_settings(options, weights, pipe)
        settings = {key: run[key] for key in ("weights", "device", "dtype", "no_binning", "lora")}
        jobs.check_outdir(items, outdir, settings)  # images there were made with these settings: resuming is safe
        todo = jobs.pending(items, outdir, options.save_trajectory)
        world.barrier(device)  # every rank has listed what is left before any rank writes
        if world.rank == 0:
            print(f"{len(todo)} of {len(items)} images to make in {outdir}, {world.size} process(es)")
        add_loras(pipe, options)
        settings |= {"rank": world.rank}
        written = jobs.generate(
            pipe,
            todo[world.rank :: world.size],
            outdir,
            jobs.manifest_path(outdir, world),
            settings,
            batch_size=options.batch_size,
            binning=not options.no_binning,
            trajectory=options.save_trajectory,
            progress=world.rank == 0,
        )
        (written,) = world.sum([written], device)
        if world.rank == 0:
            listed = jobs.merge_manifests(outdir)
            elapsed = time.perf_counter() - started
            print(f"wrote {written} images in {elapsed:.1f} s; {outdir / jobs.MANIFEST} lists {listed}")
    finally:
        world.stop()


def sampled(options: Options, config) -> dict:
    """Steps, guidance and size: the flags', else the checkpoint's (flags are checked positive, so `or` only
    replaces an unset one); the size is checked against the checkpoint now, before any weight is read."""
    from mirage.pipeline import check_size

    sampling = config.sampling
    height, width = options.height or sampling.default_sample_size, options.width or sampling.default_sample_size
    try:
        check_size(height, width, config.pixel_multiple, binning=not options.no_binning)
    except ValueError as err:
        raise ValueError(f"--height/--width: {err}") from None
    return {
        "steps": options.steps or sampling.num_inference_steps,
        "guidance": options.guidance or sampling.guidance_scale,
        "height": height,
        "width": width,
    }


def note_unused_negative(options: Options, guidance: float) -> None:
    """Say so when --negative-prompt cannot act: only classifier-free guidance (> 1) uses it, and distilled
    checkpoints default to 1."""
    if options.negative_prompt and guidance <= 1:
        print(f"note: --negative-prompt is not used with guidance {guidance:g} (it acts through guidance > 1)")


def open_pipeline(options: Options, weights: Path, device):
    """The checkpoint opened for `device` in --dtype (each model is read when first used)."""
    from mirage.pipeline import MiragePipeline
    from mirage.precision import DTYPES

    dtype = DTYPES.get(options.dtype)
    # --prompt encodes once: free the text encoder before the transformer is read. A prompts file encodes at every
    # batch: keep it where memory is ample (the pipeline's default), rather than read it again each time.
    keep_text_encoder = False if options.prompts_file is None else None
    return MiragePipeline.from_pretrained(
        weights, device=device, dtype=dtype, offload=options.offload, keep_text_encoder=keep_text_encoder,
        compile=options.compile, cuda_graph=options.cuda_graph,
    )  # fmt: skip


def add_loras(pipe, options: Options) -> None:
    """Every --lora, unfused: checked now, attached when the transformer is read (see MiragePipeline.load_lora)."""
    for lora_path, scale in map(lora_spec, options.lora or []):
        pipe.load_lora(lora_path, scale, name=str(lora_path))


OUT_OF_MEMORY = "out of memory: try a smaller --height/--width, fewer --num-images or a smaller --batch-size"


def out_of_memory(err: Exception) -> bool:
    """torch reports running out of memory as RuntimeErrors: torch.OutOfMemoryError on CUDA, "MPS backend out of
    memory" on Apple GPUs, the CPU allocator's "can't allocate memory" (a thousand 1024 px images at once)."""
    return type(err).__name__ == "OutOfMemoryError" or any(s in str(err) for s in ("out of memory", "can't allocate"))


def run_settings(options: Options, weights: Path, pipe) -> dict:
    """What every PNG's metadata records about the run, besides the image's own prompt and seed: the device and
    dtype are those it ran on and in (bf16 asked on a CPU without it runs fp32); paths are absolute, so that a
    resumed --prompts-file run recognises its own images whichever way the paths are written."""
    from mirage.precision import DTYPES

    loras = [{"path": str(path.resolve()), "scale": scale} for path, scale in map(lora_spec, options.lora or [])]
    dtype = next(name for name, dtype in DTYPES.items() if dtype == pipe.dtype)
    return {**asdict(options), "weights": str(weights.resolve()), "lora": loras, "device": str(pipe.device),
            "dtype": dtype}  # fmt: skip


if __name__ == "__main__":
    mirage.stop_on_signals()
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("sample.py: interrupted: images finished so far are written, none half-written")
    except MemoryError:
        sys.exit(f"sample.py: error: {OUT_OF_MEMORY}")
    except (ValueError, OSError, RuntimeError, ArithmeticError) as err:  # CheckpointError is a RuntimeError
        sys.exit(f"sample.py: error: {OUT_OF_MEMORY if out_of_memory(err) else err}")
