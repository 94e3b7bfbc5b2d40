"""Many images in one run: a prompts file, its items split over torchrun processes and batched, written
resumably with a manifest, and optionally a strip of the model's predicted clean image across the schedule.

`sample.py --prompts-file` is the front end; the pieces are public for anyone scripting `MiragePipeline`.

A prompts file holds one item per non-blank line: a plain prompt, or a JSON object (a line starting with "{")
with "prompt" and any of "negative_prompt", "seed", "height", "width", "steps", "guidance", "name". Items
are numbered from 0 in file order (blank lines do not count); item i gets seed `--seed + i` unless it names
one, and is written to `{i:05d}-{slug of the prompt}.png`, or `{name}.png`. That file name is the item's
identity: a re-run skips the items whose files exist, so a crashed or pre-empted run goes on where it stopped.
A file made with other settings (another seed, size, checkpoint, ...) is not skipped silently: the run stops
before it starts, naming the file and what changed. Every image draws its noise from its own seed, so it does
not depend on the batch size, the rank or the number of processes (beyond float rounding: batched kernels round
differently, which may move a pixel value by one level).

Processes: torchrun's RANK / WORLD_SIZE / LOCAL_RANK decide (one process without them). Every rank lists
the items still to do, and after a barrier rank r takes the r-th, (r + WORLD_SIZE)-th, ... of them, on cuda:LOCAL_RANK
(nccl) or the CPU (gloo). Each rank appends a line to its own manifest as it writes each image; at the end
rank 0 merges them into manifest.jsonl.
"""

import json
import math
import os
import re
import time
import unicodedata
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from .autoencoder import decode_latents, to_unit_range
from .pipeline import (
    SEED_RANGE, MiragePipeline, as_device, check_device, check_size, default_device, resize_and_crop, to_pil,
)  # fmt: skip

MANIFEST = "manifest.jsonl"
TRAJECTORIES = "trajectories"  # folder under the output folder for the strips, so it holds one PNG per item
TRAJECTORY_FRAMES = 5


class PromptsFileError(ValueError):
    """A prompts file that cannot be used; the message starts with FILE:LINE."""


# ---- prompts files ----


@dataclass(frozen=True)
class Defaults:
    """The settings of items that do not give their own: the command line's, else the checkpoint's."""

    negative_prompt: str
    seed: int  # item i gets seed + i
    height: int
    width: int
    steps: int
    guidance: float


@dataclass(frozen=True)
class Item:
    """One image to make, every setting decided."""

    index: int  # position among the file's prompts: the seed offset and the file-name prefix
    line: int  # 1-based line of the prompts file it comes from
    name: str  # file stem
    prompt: str
    negative_prompt: str
    seed: int
    height: int
    width: int
    steps: int
    guidance: float

    @property
    def file(self) -> str:
        return f"{self.name}.png"

    @property
    def call_key(self) -> tuple:
        """Items with equal keys can share one pipeline call."""
        return (self.height, self.width, self.steps, self.guidance)


# The keys a JSON line may hold, with their JSON types.
ITEM_KEYS = {"prompt": str, "negative_prompt": str, "name": str, "seed": int, "height": int, "width": int,
             "steps": int, "guidance": (int, float)}  # fmt: skip


def read_prompts(path: str | Path, defaults: Defaults) -> list[Item]:
    """Every item of a prompts file, all checked before any is made; the first bad line raises a
    PromptsFileError that names it."""
    path = Path(path)
    items, line_of_name = [], {}
    try:
        with path.open(encoding="utf-8-sig") as lines:  # -sig: a byte-order mark is not part of the first prompt
            for number, text in enumerate(lines, start=1):
                if not text.strip():
                    continue
                where = f"{path}:{number}"
                item = _item(_settings(text, where), len(items), number, defaults, where)
                if item.name in line_of_name:
                    raise PromptsFileError(f"{where}: name {item.name!r} is taken by line {line_of_name[item.name]}")
                line_of_name[item.name] = number
                items.append(item)
    except UnicodeDecodeError as err:
        raise PromptsFileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:  # missing, a folder, unreadable (a pipe such as /dev/stdin is fine)
        raise PromptsFileError(f"{path}: cannot read it ({err.strerror}): give a text file of prompts") from None
    if not items:
        raise PromptsFileError(f"{path}: holds no prompts")
    return items


def _settings(text: str, where: str) -> dict:
    """A line's own settings: {"prompt": line} for plain text, the checked object for a JSON line."""
    if not text.lstrip().startswith("{"):
        if text.lstrip().startswith("[") and _is_json_array(text):  # "[cinematic] a fox" is a prompt
            raise PromptsFileError(f"{where}: a JSON array: write one JSON object per line (JSON Lines) instead")
        return {"prompt": text.strip()}
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptsFileError(
            f'{where}: bad JSON: {err.msg} (column {err.colno}); a plain prompt starting with "{{" must be written '
            f'{{"prompt": ...}}'
        ) from None
    unknown = [key for key in settings if key not in ITEM_KEYS]
    if unknown:
        raise PromptsFileError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(ITEM_KEYS)})")
    if "prompt" not in settings:
        raise PromptsFileError(f'{where}: no "prompt"')
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, ITEM_KEYS[key]):
            kind = {str: "a string", int: "an integer"}.get(ITEM_KEYS[key], "a number")
            raise PromptsFileError(f"{where}: {key} must be {kind}, got {json.dumps(value)}")
    return settings


def _is_json_array(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except json.JSONDecodeError:
        return False


def _item(settings: dict, index: int, line: int, defaults: Defaults, where: str) -> Item:
    """The line's own settings over the defaults, checked."""
    settings = {**asdict(defaults), "seed": defaults.seed + index, **settings}
    settings["name"] = settings.get("name", default_name(index, settings["prompt"]))
    item = Item(index=index, line=line, **{**settings, "guidance": float(settings["guidance"])})
    if not item.prompt.strip():
        raise PromptsFileError(f"{where}: empty prompt")
    for key in ("prompt", "negative_prompt", "name"):
        try:
            getattr(item, key).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, which a JSON \u escape can make and no file can store
            raise PromptsFileError(f"{where}: {key} holds a lone UTF-16 surrogate: check its \\u escapes") from None
    if not 0 <= item.seed < SEED_RANGE:
        raise PromptsFileError(f"{where}: seed must be in [0, 2**64), got {item.seed}")
    if item.steps < 1:
        raise PromptsFileError(f"{where}: steps must be at least 1, got {item.steps}")
    try:
        check_size(item.height, item.width, multiple=1, binning=True)  # the range; the multiple is the checkpoint's
    except ValueError as err:
        raise PromptsFileError(f"{where}: {err}") from None
    if not (math.isfinite(item.guidance) and item.guidance >= 1):
        raise PromptsFileError(f"{where}: guidance must be >= 1 (1 turns it off), got {item.guidance}")
    if not (re.fullmatch(r"\w[\w.-]*", item.name) and len(item.name.encode()) <= 200):  # file names: 255 bytes
        raise PromptsFileError(
            f"{where}: name {item.name!r} is not a plain file name (letters, digits, _ . -; at most 200 bytes)"
        )
    return item


def default_name(index: int, prompt: str) -> str:
    """'00007-a-cafe-at-night' for item 7, "A café at night!": sortable, and readable in a file listing."""
    words = re.findall(r"[a-z0-9]+", unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower())
    slug = "-".join(words)[:48].rstrip("-")
    return f"{index:05d}-{slug}" if slug else f"{index:05d}"


def check_sizes(items: list[Item], multiple: int, source: str | Path) -> None:
    """Without resolution binning every size must be a whole number of latent patches (`multiple` pixels)."""
    for item in items:
        try:
            check_size(item.height, item.width, multiple, binning=False)
        except ValueError as err:
            raise PromptsFileError(f"{source}:{item.line}: {err}") from None


# ---- work split and resume ----


def item_paths(item: Item, outdir: Path, trajectory: bool) -> list[Path]:
    paths = [outdir / item.file]
    return paths + [outdir / TRAJECTORIES / item.file] if trajectory else paths


def pending(items: list[Item], outdir: Path, trajectory: bool = False) -> list[Item]:
    """The items whose outputs are not all on disk."""
    return [item for item in items if not all(p.exists() for p in item_paths(item, outdir, trajectory))]


# What makes an image besides the model's weights: a re-run keeps a file on disk only if these are unchanged.
MADE_WITH = ("prompt", "negative_prompt", "seed", "height", "width", "steps", "guidance",
             "weights", "dtype", "no_binning", "lora")  # fmt: skip


def check_outdir(items: list[Item], outdir: Path, settings: dict) -> None:
    """Before a run writes in `outdir`: a ValueError if a manifest there is not mirage's, or if an item's image is
    there but was made with other settings (the item's own, or the run's `settings`: weights, dtype, ...), as a
    resumed run would keep that image as its own."""
    for manifest in (outdir / MANIFEST, *sorted(outdir.glob("manifest.rank*.jsonl"))):
        for number, record in _records(manifest):
            fields = (("file", str), ("index", int), ("time", str))
            if not (isinstance(record, dict) and all(isinstance(record.get(key), kind) for key, kind in fields)):
                raise ValueError(f"{manifest}:{number} is not a record mirage wrote: use another --outdir")
    for item in items:
        path = outdir / item.file
        if not path.is_file():
            continue
        made = _made_with(path)
        if made is None:
            raise ValueError(f"{path} was not made by mirage (no settings in it): use another --outdir")
        asked = json.loads(json.dumps({**asdict(item), **settings}, default=str))  # as a record stores them
        changed = [key for key in MADE_WITH if made.get(key) != asked.get(key)]
        if changed:
            raise ValueError(
                f"{path} was made with {_listed(made, changed)}; this run asks {_listed(asked, changed)}: "
                "use another --outdir, or delete the file"
            )


def _made_with(path: Path) -> dict | None:
    """The settings a PNG of ours records (see `save_png`), or None for any other file."""
    try:
        with Image.open(path) as image:
            return json.loads(getattr(image, "text", {})["mirage"])
    except (OSError, SyntaxError, KeyError, ValueError):  # not an image, a broken PNG, no or bad settings
        return None


def _listed(values: dict, keys: list[str]) -> str:
    shown = {key: json.dumps(values.get(key), ensure_ascii=False) for key in keys}
    return ", ".join(f"{key} {text if len(text) <= 60 else text[:57] + '...'}" for key, text in shown.items())


def batches(items: list[Item], size: int) -> list[list[Item]]:
    """Groups of at most `size` items that can share a pipeline call, keeping file order within a group."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(item.call_key, []).append(item)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


@dataclass(frozen=True)
class World:
    """This process's place among those torchrun started: rank 0 of 1 without torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=os.environ) -> "World":
        """RANK, WORLD_SIZE and LOCAL_RANK, as torchrun (or any torch.distributed launcher) sets them."""
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world = cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
        except (KeyError, ValueError):
            raise ValueError("WORLD_SIZE is set but RANK or LOCAL_RANK is missing or not a number") from None
        if not 0 <= world.rank < world.size:
            raise ValueError(f"RANK {world.rank} is outside WORLD_SIZE {world.size}")
        return world

    def device(self, requested: str | None = None) -> torch.device:
        """The requested device (default: cuda, mps, cpu); with several processes, CUDA means cuda:LOCAL_RANK."""
        device = as_device(requested) if requested else default_device()
        if self.size > 1 and device.type == "cuda":
            if device.index is not None:
                raise ValueError(f"with torchrun LOCAL_RANK picks the GPU: pass --device cuda, not {device}")
            device = torch.device("cuda", self.local_rank)
        check_device(device)  # after LOCAL_RANK picks the GPU, so that --device cuda:N gets the advice above
        return device

    def start(self, device: torch.device) -> None:
        """Join the process group: nccl between GPUs, gloo otherwise. Alone, nothing to join."""
        if self.size == 1:
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=RANKS_WAIT)

    def barrier(self, device: torch.device) -> None:
        if self.size > 1:
            dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)

    def sum(self, counts: list[int], device: torch.device) -> list[int]:
        """`counts` summed over the ranks; every rank has finished its work when this returns."""
        if self.size == 1:
            return counts
        total = torch.tensor(counts, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(total)
        return total.tolist()

    def stop(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


# How long a rank that has finished waits for the others at the end (NCCL's default is 10 minutes): with mixed sizes
# and step counts the shares can differ by hours; torchrun stops every rank if one fails, so this only waits for work.
RANKS_WAIT = timedelta(hours=24)


# ---- outputs and the manifest ----


def manifest_path(outdir: Path, world: World) -> Path:
    """Where this process appends its records: manifest.jsonl alone, its own file among several."""
    return outdir / (MANIFEST if world.size == 1 else f"manifest.rank{world.rank}.jsonl")


def save_png(image: Image.Image, path: Path, settings: dict) -> None:
    """A PNG whose text metadata holds the prompt and every setting that made it."""
    info = PngInfo()
    info.add_text("prompt", settings["prompt"])
    info.add_text("mirage", json.dumps(settings, default=str))
    image.save(path, format="PNG", pnginfo=info)


def write_png(image: Image.Image, path: Path, settings: dict) -> None:
    """`save_png` through a .partial file renamed into place (making the folder first): a run stopped while
    writing leaves no truncated PNG under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_png(image, _partial(path), settings)
        os.replace(_partial(path), path)
    finally:
        _partial(path).unlink(missing_ok=True)


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line, ending first a line that an earlier run's crash cut short."""
    with path.open("a+b") as manifest:
        end = manifest.seek(0, os.SEEK_END)
        if end:
            manifest.seek(end - 1)
            if manifest.read(1) != b"\n":
                manifest.write(b"\n")
        manifest.write(json.dumps(record, default=str).encode() + b"\n")


def write_item(outdir: Path, item: Item, image, strip, record: dict, manifest: Path) -> None:
    """Write an item's image (and strip), so that a file in place always has its manifest record: each picture
    goes to a .partial file, the record is appended, and only then are the pictures renamed into place, the strip
    first (an image in place means its strip is too). An error leaves no .partial file behind."""
    pictures = dict(zip(item_paths(item, outdir, strip is not None), (image, strip)))
    try:
        for path, picture in pictures.items():
            save_png(picture, _partial(path), record)
        append_record(manifest, record)
        for path in reversed(pictures):
            os.replace(_partial(path), path)
    finally:
        for path in pictures:
            _partial(path).unlink(missing_ok=True)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _records(manifest: Path):
    """(line number, record) for each whole line of a manifest, if there is one; a line cut short by a crash
    (before its image was renamed into place, so that item is redone) is skipped."""
    if not manifest.is_file():
        return
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{manifest} is not a manifest mirage wrote (not UTF-8): use another --outdir") from None
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        yield number, record


def merge_manifests(outdir: Path) -> int:
    """Fold every rank's manifest into manifest.jsonl: per file the newest record, only for files that exist, in
    item order; the rank files are removed. -> the number of records."""
    sources = [outdir / MANIFEST, *sorted(outdir.glob("manifest.rank*.jsonl"))]
    newest: dict[str, dict] = {}
    for source in sources:
        for _, record in _records(source):
            if record["file"] not in newest or record["time"] >= newest[record["file"]]["time"]:
                newest[record["file"]] = record
    records = sorted((r for r in newest.values() if (outdir / r["file"]).exists()), key=lambda r: r["index"])
    merged = _partial(outdir / MANIFEST)
    merged.write_text("".join(json.dumps(r, default=str) + "\n" for r in records), encoding="utf-8")
    os.replace(merged, outdir / MANIFEST)
    for source in sources[1:]:
        source.unlink()
    return len(records)


# ---- generation ----


class Trajectory:
    """A pipeline callback keeping the model's predicted clean latents at every step, and drawing a few of them.

    With x_sigma = (1 - sigma) x0 + sigma eps and v = eps - x0, the prediction is x0 = x_sigma - sigma v: the image
    the model is heading for, seen from that step. `denoise` calls back before its Euler update, with the latents
    still at sigma; at the last step (next sigma 0) the prediction is the final latents, bit for bit.

    Shapes as in `mirage.pipeline`: N images, C latent channels, h/w latent grid, H'/W' the generated size,
    H/W the requested one.
    """

    def __init__(self):
        self.sigmas: list[float] = []
        self.x0: list[torch.Tensor] = []  # per step: [N, C, h, w]

    def __call__(self, step: int, sigma: torch.Tensor, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        self.sigmas.append(float(sigma))
        # The Euler update's fp32 arithmetic, so that the last frame equals the final image exactly.
        self.x0.append((latents.float() - sigma * velocity.float()).to(latents.dtype))  # [N, C, h, w]

    def frames(self, count: int = TRAJECTORY_FRAMES) -> list[int]:
        """Up to `count` steps spread evenly over the schedule, the first and the last included."""
        last = len(self.x0) - 1
        return sorted({round(i * last / max(count - 1, 1)) for i in range(count)})

    def strips(
        self, pipe: MiragePipeline, height: int, width: int, count: int = TRAJECTORY_FRAMES
    ) -> list[Image.Image]:
        """One picture per image: the decoded predictions of `frames(count)` side by side, noisiest first, each
        height x width (resized and cropped from the generated size as the pipeline does it)."""
        with pipe.running("vae") as vae:  # on the device for the decode, with offloading too
            decoded = [decode_latents(vae, self.x0[step]) for step in self.frames(count)]  # [N, 3, H', W'] each
        frames = [to_unit_range(resize_and_crop(images, height, width)) for images in decoded]  # [N, 3, H, W] each
        return to_pil(torch.cat(frames, dim=-1))  # N x [H, frames * W]


def generate(
    pipe: MiragePipeline,
    items: list[Item],
    outdir: Path,
    manifest: Path,
    settings: dict,
    batch_size: int = 1,
    binning: bool = True,
    trajectory: bool = False,
    progress: bool = True,
) -> int:
    """Make and write `items`, `batch_size` compatible ones per pipeline call; -> how many were written.

    `settings` (the run's: weights, dtype, ...) go into every record with the item's own. One progress bar runs
    over the items, with images per minute, and one over each call's steps inside it.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    if trajectory:
        (outdir / TRAJECTORIES).mkdir(exist_ok=True)
    started, written = time.perf_counter(), 0
    with tqdm(total=len(items), unit="image", disable=not progress) as bar:
        for batch in batches(items, batch_size):
            call_started = time.perf_counter()
            images, strips, sigmas = make_batch(pipe, batch, binning, trajectory, progress)
            seconds = (time.perf_counter() - call_started) / len(batch)
            for item, image, strip in zip(batch, images, strips):
                record = {**asdict(item), "file": item.file, **settings, "seconds": round(seconds, 3)}
                if strip is not None:
                    record |= {"trajectory": f"{TRAJECTORIES}/{item.file}", "trajectory_sigmas": sigmas}
                record["time"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
                write_item(outdir, item, image, strip, record, manifest)
            written += len(batch)
            bar.update(len(batch))
            bar.set_postfix_str(f"{written * 60 / (time.perf_counter() - started):.1f} images/min")
    return written


def make_batch(
    pipe: MiragePipeline, batch: list[Item], binning: bool, trajectory: bool, progress: bool
) -> tuple[list[Image.Image], list[Image.Image | None], list[float] | None]:
    """One pipeline call for items that share a call key, with a progress bar over its steps; -> the images, then
    with `trajectory` their strips and the sigmas of the strips' frames (else Nones and None)."""
    first = batch[0]
    recorder = Trajectory() if trajectory else None
    with tqdm(total=first.steps, unit="step", leave=False, disable=not progress) as step_bar:

        def on_step(*step):  # (step, sigma, latents, velocity)
            step_bar.update()
            if recorder is not None:
                recorder(*step)

        images = pipe(
            [item.prompt for item in batch],
            negative_prompt=[item.negative_prompt for item in batch],
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            seed=[item.seed for item in batch],
            use_resolution_binning=binning,
            callback=on_step,
            progress=False,
        )
    if recorder is None:
        return images, [None] * len(batch), None
    sigmas = [recorder.sigmas[step] for step in recorder.frames()]
    return images, recorder.strips(pipe, first.height, first.width), sigmas

