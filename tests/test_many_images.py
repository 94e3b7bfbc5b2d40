"""Many images: prompts files, torchrun sharding, resumable output folders, batching and trajectory strips.

A torchrun run (two processes, one image per call) is compared with an in-process run of the same command
batching three items per call, on a tiny converted checkpoint; a killed run is simulated on its output folder.
"""

import dataclasses
import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from mirage import jobs
from mirage.pipeline import MiragePipeline

SAMPLE_PY = Path(sample.__file__).resolve()
IMAGE_TOL = 2e-5  # on images in [0, 1]; a batch differs from its images made alone by ~1e-6

PROMPTS = """a red fox in the snow
{"prompt": "a lighthouse at night", "seed": 1234, "name": "lighthouse"}

{"prompt": "a café in Paris", "height": 96, "width": 64}
a bowl of ramen, studio photo
{"prompt": "tiny robot", "steps": 1, "negative_prompt": "blurry"}
{"prompt": "東京 夜景", "guidance": 1}
"""
NAMES = ["00000-a-red-fox-in-the-snow", "lighthouse", "00002-a-cafe-in-paris", "00003-a-bowl-of-ramen-studio-photo",
         "00004-tiny-robot", "00005"]  # fmt: skip
DEFAULTS = jobs.Defaults(negative_prompt="", seed=10, height=64, width=64, steps=2, guidance=4.0)


def flags(checkpoint, prompts_file, outdir, *extra):
    return ["--weights", str(checkpoint), "--prompts-file", str(prompts_file), "--outdir", str(outdir), "--seed", "10",
            "--steps", "2", "--height", "64", "--width", "64", "--no-binning", "--device", "cpu", *extra]  # fmt: skip


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def assert_same_images(folder, reference, names):
    """Equal 8-bit images: a difference below IMAGE_TOL moves a value by at most one level after rounding, and
    only where it sat at a rounding boundary."""
    for name in names:
        ours, ref = pixels(folder / f"{name}.png"), pixels(reference / f"{name}.png")
        assert ours.shape == ref.shape, name
        diff = np.abs(ours - ref)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (name, diff.max(), (diff > 0).mean())


def manifest(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / jobs.MANIFEST).read_text().splitlines()]


def stamp(path):
    status = path.stat()
    return status.st_mtime_ns, status.st_ino


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single_run(mirage_flux, prompts_file, tmp_path_factory):
    """The reference: the same command in one process, batching items 0, 1 and 3 (the only compatible ones)."""
    outdir = tmp_path_factory.mktemp("single") / "out"
    sample.main(flags(mirage_flux, prompts_file, outdir, "--batch-size", "3"))
    return outdir


def test_reading_prompts_file(prompts_file):
    items = jobs.read_prompts(prompts_file, DEFAULTS)
    assert [item.name for item in items] == NAMES
    assert [item.line for item in items] == [1, 2, 4, 5, 6, 7]  # blank lines are skipped but counted
    assert [item.seed for item in items] == [10, 1234, 12, 13, 14, 15]  # --seed + index unless given
    assert (items[2].height, items[2].width, items[4].steps, items[5].guidance) == (96, 64, 1, 1.0)
    assert items[4].negative_prompt == "blurry" and items[0].negative_prompt == ""
    batches = jobs.batches(items, 2)  # same size, steps and guidance share a call, in file order
    assert [[item.index for item in batch] for batch in batches] == [[0, 1], [3], [2], [4], [5]]


def test_default_names_are_slugs_of_at_most_48_characters():
    assert jobs.default_name(7, "A café at night!") == "00007-a-cafe-at-night"
    assert jobs.default_name(0, "a" * 47 + " b") == "00000-" + "a" * 47  # cut at a hyphen: no trailing one
    assert jobs.default_name(12, "東京 !!") == "00012"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a cat", "seed": 3', "bad JSON"),
        ('{"prompt": "a cat", "colour": "red"}', "unknown key 'colour'"),
        ('{"negative_prompt": "blurry"}', 'no "prompt"'),
        ('{"prompt": "a cat", "steps": "four"}', "steps must be an integer"),
        ('{"prompt": "a cat", "guidance": 0.5}', "guidance must be >= 1"),
        ('{"prompt": "a cat", "width": 16385}', "height and width must be 1 to 16384 pixels, got 64x16385"),
        ('{"prompt": "a cat", "name": "../escape"}', "not a plain file name"),
        ('{"prompt": "a cat", "name": "lighthouse"}', "taken by line 2"),
        ('{"prompt": "   "}', "empty prompt"),
        ('{"prompt": "a dog \\ud83d"}', "prompt holds a lone UTF-16 surrogate"),  # no PNG text could hold it
        ('{"prompt": "a cat", "name": "%s"}' % ("東" * 100), "at most 200 bytes"),  # 300 bytes: too long a file name
        ('[{"prompt": "a cat"}]', "a JSON array: write one JSON object per line"),
        ('{a cat}', 'a plain prompt starting with "{" must be written {"prompt": ...}'),
    ],
)
def test_malformed_prompts_file_names_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f'a dog\n{{"prompt": "x", "name": "lighthouse"}}\n\n{line}\nnever read\n', encoding="utf-8")
    with pytest.raises(jobs.PromptsFileError) as error:
        jobs.read_prompts(path, DEFAULTS)
    assert str(error.value).startswith(f"{path}:4: ") and message in str(error.value)


def test_malformed_prompts_file_stops_the_command_before_generation(tmp_path, mirage_flux):
    path = tmp_path / "bad.jsonl"
    path.write_text('a dog\n{"prompt": "a cat", "sead": 3}\n', encoding="utf-8")
    outdir = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(SAMPLE_PY), *flags(mirage_flux, path, outdir)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0
    assert run.stderr.strip() == f"sample.py: error: {path}:2: unknown key 'sead' (known: {', '.join(jobs.ITEM_KEYS)})"
    assert not outdir.exists()
    # A size that the model cannot make without binning is also found before the first image, with its line.
    path.write_text('a dog\n{"prompt": "a cat", "width": 72}\n', encoding="utf-8")
    with pytest.raises(jobs.PromptsFileError, match=f"{path}:2: height and width must be multiples of 16 .* got 64x72"):
        sample.main(flags(mirage_flux, path, outdir))
    assert not list(outdir.glob("*.png"))


def test_sizes_from_the_command_line_are_not_blamed_on_the_prompts_file(tmp_path, mirage_flux):
    path = tmp_path / "p.txt"
    path.write_text("a dog\n", encoding="utf-8")
    for size, message in (("20000", "1 to 16384 pixels, got 20000x64"), ("72", "multiples of 16 .* got 72x64")):
        with pytest.raises(ValueError, match=f"^--height/--width: height and width must be {message}"):
            sample.main(flags(mirage_flux, path, tmp_path / "out", "--height", size))
    for missing in (tmp_path / "nope.txt", tmp_path):  # a missing file, a folder
        with pytest.raises(jobs.PromptsFileError, match=f"^{missing}: cannot read it"):
            sample.main(flags(mirage_flux, missing, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_prompts_from_a_pipe_and_prompts_in_brackets(tmp_path):
    fifo = tmp_path / "fifo"  # as `--prompts-file <(...)` or /dev/stdin give it
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("[cinematic] a fox\n[1, 2] ribbons\n",))
    writer.start()
    items = jobs.read_prompts(fifo, DEFAULTS)
    writer.join()
    assert [item.prompt for item in items] == ["[cinematic] a fox", "[1, 2] ribbons"]


def test_a_rerun_with_other_settings_is_refused_before_it_starts(tmp_path, mirage_flux):
    """Resuming keeps the images on disk: they must have been made with the settings of this run."""
    path, outdir = tmp_path / "p.jsonl", tmp_path / "out"
    path.write_text('a dog\n{"prompt": "a cat", "name": "hero"}\n', encoding="utf-8")
    run = flags(mirage_flux, path, outdir, "--steps", "1")
    sample.main(run)
    before = {p.name: stamp(p) for p in outdir.iterdir()}
    relative = flags(Path("..") / mirage_flux.parent.name / mirage_flux.name, path, outdir, "--steps", "1")
    with pytest.MonkeyPatch.context() as patch:  # the same command from elsewhere, the weights' path written another way
        patch.chdir(tmp_path)
        sample.main(relative)
    assert {p.name: stamp(p) for p in outdir.iterdir() if p.name != jobs.MANIFEST} == {
        name: when for name, when in before.items() if name != jobs.MANIFEST
    }
    with pytest.raises(ValueError, match=rf"^{outdir / '00000-a-dog.png'} was made with seed 10; this run asks "
                                         r"seed 11: use another --outdir, or delete the file$"):  # fmt: skip
        sample.main([*run, "--seed", "11"])
    path.write_text('a dog\n{"prompt": "a black cat", "name": "hero"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match='hero.png was made with prompt "a cat"; this run asks prompt "a black cat"'):
        sample.main(run)
    path.write_text('a dog\n{"prompt": "a cat", "name": "hero"}\n', encoding="utf-8")
    Image.new("RGB", (8, 8)).save(outdir / "hero.png")  # a picture that is not ours, under an item's name
    with pytest.raises(ValueError, match="hero.png was not made by mirage"):
        sample.main(run)
    (outdir / "hero.png").unlink()
    (outdir / jobs.MANIFEST).write_text('{"image": "a.png", "caption": "a cat"}\n')  # a data set's own manifest
    with pytest.raises(ValueError, match=f"^{outdir / jobs.MANIFEST}:1 is not a record mirage wrote"):
        sample.main(run)
    assert {p.name: stamp(p) for p in outdir.iterdir() if p.name != jobs.MANIFEST} == {
        name: when for name, when in before.items() if name not in (jobs.MANIFEST, "hero.png")
    }  # nothing written by the refused runs


def test_write_item_renames_the_strip_first_and_leaves_no_partial_file(tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / jobs.TRAJECTORIES).mkdir()
    item = jobs.read_prompts(tmp_path / "p.txt", DEFAULTS)[0]
    picture, record, renamed, replace = Image.new("RGB", (8, 8)), {"prompt": "a cat", "file": item.file}, [], os.replace
    monkeypatch.setattr(jobs.os, "replace", lambda src, dst: renamed.append(dst.relative_to(tmp_path)) or replace(src, dst))
    jobs.write_item(tmp_path, item, picture, picture, record, tmp_path / jobs.MANIFEST)
    assert renamed == [Path(jobs.TRAJECTORIES, item.file), Path(item.file)]  # an image in place has its strip
    (tmp_path / item.file).unlink()

    def disk_full(path, record):
        raise OSError("No space left on device")

    monkeypatch.setattr(jobs, "append_record", disk_full)
    with pytest.raises(OSError, match="No space left"):
        jobs.write_item(tmp_path, item, picture, picture, record, tmp_path / jobs.MANIFEST)
    assert not list(tmp_path.rglob("*.partial")) and not (tmp_path / item.file).exists()


def test_an_item_is_pending_until_its_image_and_its_strip_are_both_there(tmp_path):
    """A run with --save-trajectory redoes an item whose image an earlier run without it wrote."""
    (tmp_path / "p.txt").write_text("a cat\n")
    item = jobs.read_prompts(tmp_path / "p.txt", DEFAULTS)[0]
    assert jobs.pending([item], tmp_path) == jobs.pending([item], tmp_path, trajectory=True) == [item]
    (tmp_path / item.file).write_bytes(b"")
    assert jobs.pending([item], tmp_path) == [] and jobs.pending([item], tmp_path, trajectory=True) == [item]
    (tmp_path / jobs.TRAJECTORIES).mkdir()
    (tmp_path / jobs.TRAJECTORIES / item.file).write_bytes(b"")
    assert jobs.pending([item], tmp_path, trajectory=True) == []


def test_merged_manifest_keeps_the_newest_record_of_each_file_on_disk(tmp_path):
    """An item redone (by another rank, or after a crash) has two records: the newer one describes the file."""
    old = {"file": "a.png", "index": 0, "time": "2025-01-01T10:00:00.000+00:00", "rank": 1}
    new = {**old, "time": "2025-01-01T11:00:00.000+00:00", "rank": 0}
    gone = {"file": "b.png", "index": 1, "time": old["time"], "rank": 0}  # its image was deleted since
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / jobs.MANIFEST).write_text(json.dumps(new) + "\n" + json.dumps(gone) + "\n")
    (tmp_path / "manifest.rank1.jsonl").write_text(json.dumps(old) + "\n")
    assert jobs.merge_manifests(tmp_path) == 1
    assert manifest(tmp_path) == [new] and not (tmp_path / "manifest.rank1.jsonl").exists()


@pytest.mark.parametrize(
    "change",
    [{"prompt": "a dog"}, {"negative_prompt": "blurry"}, {"seed": 11}, {"height": 96}, {"width": 96}, {"steps": 3},
     {"guidance": 2.0}, {"weights": "/other"}, {"dtype": "bf16"}, {"no_binning": False},
     {"lora": [{"path": "/style.safetensors", "scale": 0.8}]}],  # fmt: skip
    ids=lambda change: next(iter(change)),
)
def test_an_image_is_kept_only_if_every_setting_that_made_it_is_unchanged(tmp_path, change):
    (tmp_path / "p.txt").write_text("a cat\n")
    item = jobs.read_prompts(tmp_path / "p.txt", DEFAULTS)[0]
    settings = {"weights": "/weights", "dtype": "fp32", "no_binning": True, "lora": []}
    jobs.save_png(Image.new("RGB", (8, 8)), tmp_path / item.file, {**dataclasses.asdict(item), **settings})
    jobs.check_outdir([item], tmp_path, settings)  # the same settings: the image is kept
    own = {key: value for key, value in change.items() if hasattr(item, key)}  # the item's setting, else the run's
    run = {**settings, **{key: value for key, value in change.items() if key not in own}}
    with pytest.raises(ValueError, match=f"made with {next(iter(change))} "):
        jobs.check_outdir([dataclasses.replace(item, **own)], tmp_path, run)


def test_torchrun_shards_items_and_resumes_a_killed_run(mirage_flux, prompts_file, single_run, tmp_path):
    outdir = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(SAMPLE_PY), *flags(mirage_flux, prompts_file, outdir)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]

    # Every item exactly once, by rank index % 2, the same pictures as one process, one merged manifest.
    assert sorted(p.name for p in outdir.iterdir()) == sorted([f"{name}.png" for name in NAMES] + [jobs.MANIFEST])
    assert_same_images(outdir, single_run, NAMES)
    records = manifest(outdir)
    assert [r["file"] for r in records] == [f"{name}.png" for name in NAMES]
    assert [r["rank"] for r in records] == [0, 1, 0, 1, 0, 1]
    assert {(r["device"], r["dtype"]) for r in records} == {("cpu", "fp32")}  # what ran, as with --prompt
    assert [r["seed"] for r in records] == [r["seed"] for r in manifest(single_run)] == [10, 1234, 12, 13, 14, 15]
    assert [(r["steps"], r["guidance"]) for r in records] == [(2, 5.0)] * 4 + [(1, 5.0), (2, 1.0)]
    assert Image.open(outdir / "00002-a-cafe-in-paris.png").size == (64, 96)
    assert json.loads(Image.open(outdir / "lighthouse.png").text["mirage"])["seed"] == 1234

    # A run killed after writing four images: two images and their records missing, a record cut short
    # mid-write, a picture never renamed into place, a rank's manifest never merged.
    lost = [NAMES[1], NAMES[4]]
    kept = [name for name in NAMES if name not in lost]
    for name in lost:
        (outdir / f"{name}.png").unlink()
    (outdir / f"{lost[0]}.png.partial").write_bytes(b"\x89PNG cut short")
    (outdir / "manifest.rank1.jsonl").write_text(json.dumps(records[3]) + "\n")
    merged = [json.dumps(r) + "\n" for r in records if r["index"] not in (1, 3, 4)]
    (outdir / jobs.MANIFEST).write_text("".join(merged) + '{"file": "0000')
    before = {name: stamp(outdir / f"{name}.png") for name in kept}

    sample.main(flags(mirage_flux, prompts_file, outdir))  # the re-run, now in one process

    assert {name: stamp(outdir / f"{name}.png") for name in kept} == before  # finished items untouched
    assert_same_images(outdir, single_run, NAMES)
    assert sorted(p.name for p in outdir.iterdir()) == sorted([f"{name}.png" for name in NAMES] + [jobs.MANIFEST])
    records = manifest(outdir)
    assert [r["file"] for r in records] == [f"{name}.png" for name in NAMES]
    assert [r["rank"] for r in records] == [0, 0, 0, 1, 0, 1]  # the two redone items, by the lone rank 0


def test_batches_equal_one_image_at_a_time(mirage_flux):
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu")
    prompts = ["a red fox in the snow", "a very long prompt about a lighthouse at night, stars, moon, waves", "ramen"]
    negatives, seeds = ["", "blurry", "ugly, dark"], [3, 5, 7]  # prompts of different lengths: the batch pads them
    kwargs = dict(height=64, width=64, num_inference_steps=2, guidance_scale=4.0, use_resolution_binning=False,
                  output_type="pt", progress=False)  # fmt: skip
    batch = pipe(prompts, negative_prompt=negatives, seed=seeds, **kwargs)
    singles = torch.cat([pipe(p, negative_prompt=n, seed=s, **kwargs) for p, n, s in zip(prompts, negatives, seeds)])
    err = (batch - singles).abs().max().item()
    assert err <= IMAGE_TOL, err
    with pytest.raises(ValueError, match="got 2 seeds for 3 images"):
        pipe(prompts, seed=[3, 5], output_type="latent", progress=False)


def test_trajectory_recovers_the_clean_latents():
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    recorder = jobs.Trajectory()
    for step, sigma in enumerate(torch.tensor([1.0, 0.7, 0.3, 0.05])):
        recorder(step, sigma, (1 - sigma) * x0 + sigma * eps, eps - x0)  # x_sigma and the exact velocity
    assert len(recorder.x0) == 4 and all(torch.allclose(x, x0, atol=1e-5) for x in recorder.x0)
    assert recorder.frames(3) == [0, 2, 3] and recorder.frames(10) == [0, 1, 2, 3]


def test_save_trajectory_writes_strips(mirage_flux, tmp_path):
    prompts = tmp_path / "one.txt"
    prompts.write_text('{"prompt": "a café in Paris", "height": 96, "width": 64}\n')
    outdir = tmp_path / "out"
    sample.main(flags(mirage_flux, prompts, outdir, "--save-trajectory", "--steps", "3"))
    for record in manifest(outdir):
        image, strip = pixels(outdir / record["file"]), pixels(outdir / record["trajectory"])
        height, width = image.shape[:2]
        assert strip.shape == (height, 3 * width, 3) and len(record["trajectory_sigmas"]) == 3
        frames = np.split(strip, 3, axis=1)
        assert np.array_equal(frames[-1], image)  # the last prediction is the final image
        assert np.abs(frames[0] - image).mean() > 1  # the first is not
    # The single-prompt path writes NAME.trajectory.png next to each image.
    fox = tmp_path / "fox.png"
    sample.main(["--weights", str(mirage_flux), "--prompt", "a fox", "--steps", "2", "--height", "64", "--width", "64",
                 "--seed", "1", "--device", "cpu", "--output", str(fox), "--save-trajectory"])  # fmt: skip
    strip = pixels(tmp_path / "fox.trajectory.png")
    assert strip.shape == (64, 128, 3) and np.array_equal(strip[:, 64:], pixels(fox))


def test_finished_ranks_wait_for_the_others_longer_than_nccls_ten_minutes(monkeypatch):
    joined = []
    monkeypatch.setattr(jobs.dist, "init_process_group", lambda backend, **kwargs: joined.append((backend, kwargs)))
    jobs.World(0, 2, 0).start(torch.device("cpu"))
    assert joined == [("gloo", {"timeout": jobs.RANKS_WAIT})] and jobs.RANKS_WAIT.total_seconds() >= 3600


def test_world_and_flags():
    assert jobs.World.from_env({}) == jobs.World(0, 1, 0)
    assert jobs.World.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == jobs.World(3, 4, 1)
    with pytest.raises(ValueError, match="RANK 4 is outside WORLD_SIZE 4"):
        jobs.World.from_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    assert jobs.World(1, 2, 1).device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="LOCAL_RANK picks the GPU"):
        jobs.World(1, 2, 1).device("cuda:0")
    with pytest.raises(ValueError, match="either --prompt or --prompts-file"):
        sample.parse_options(["--prompt", "a", "--prompts-file", "p.txt"])
    with pytest.raises(ValueError, match="--outdir and --batch-size go with --prompts-file"):
        sample.parse_options(["--prompt", "a", "--batch-size", "2"])
    with pytest.raises(ValueError, match="--output and --num-images go with --prompt"):
        sample.parse_options(["--prompts-file", "p.txt", "--num-images", "2"])


def test_write_png_leaves_no_truncated_file(tmp_path, monkeypatch):
    image, path = Image.new("RGB", (8, 8)), tmp_path / "new" / "cat.png"
    jobs.write_png(image, path, {"prompt": "a cat"})
    assert Image.open(path).text["prompt"] == "a cat" and sorted(p.name for p in path.parent.iterdir()) == ["cat.png"]

    def disk_full(image, partial, settings):
        partial.write_bytes(b"\x89PNG cut short")
        raise OSError("No space left on device")

    monkeypatch.setattr(jobs, "save_png", disk_full)
    with pytest.raises(OSError, match="No space left"):
        jobs.write_png(image, path.with_name("dog.png"), {"prompt": "a dog"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["cat.png"]


def test_progress_bars_close_when_a_call_fails(tmp_path):
    # A bar left open keeps its line on the terminal until it is collected, after the error's message.
    from tqdm import tqdm

    def fails_at_its_first_step(*args, callback, **kwargs):
        callback(0, torch.tensor(1.0), torch.zeros(1), torch.zeros(1))
        raise RuntimeError("out of memory")

    items = [jobs.Item(0, 1, "fox", "a fox", "", 0, 64, 64, 2, 4.0)]
    open_before = set(tqdm._instances)
    with pytest.raises(RuntimeError) as failed:
        jobs.generate(fails_at_its_first_step, items, tmp_path, tmp_path / "manifest", {}, progress=True)
    assert set(tqdm._instances) == open_before, failed  # the traceback still refers to both bars


def test_text_encoder_is_read_once_per_run(mirage_flux, tmp_path, monkeypatch):
    """--prompt frees the text encoder before the transformer is read; a prompts file, which encodes at every
    batch, keeps it where memory is ample (a tiny model: always) instead of reading it again for each batch."""
    loads, load = [], MiragePipeline._load  # (model read, models held at that moment)

    def counted(pipe, name):
        loads.append((name, sorted(pipe.models)))
        return load(pipe, name)

    monkeypatch.setattr(MiragePipeline, "_load", counted)
    path = tmp_path / "three.txt"
    path.write_text("a fox\na cat\na dog\n", encoding="utf-8")
    sample.main(flags(mirage_flux, path, tmp_path / "out"))
    assert loads == [("text_encoder", []), ("transformer", ["text_encoder"]), ("vae", ["text_encoder", "transformer"])]
    loads.clear()
    sample.main(["--weights", str(mirage_flux), "--prompt", "a fox", "--steps", "1", "--height", "64", "--width", "64",
                 "--device", "cpu", "--output", str(tmp_path / "fox.png"), "--seed", "1"])  # fmt: skip
    assert loads == [("text_encoder", []), ("transformer", []), ("vae", ["transformer"])]


def test_trajectory_strips_decode_where_the_pipeline_runs_the_vae(mirage_flux, monkeypatch):
    """With model offload the VAE is on the GPU only inside `pipe.running("vae")`: the strips decode there."""
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu")
    recorder = jobs.Trajectory()
    pipe("a fox", seed=0, num_inference_steps=2, height=64, width=64, use_resolution_binning=False,
         callback=recorder, progress=False)  # fmt: skip
    inside, running = [], pipe.running

    @contextmanager
    def watched(name):
        inside.append(f"enter {name}")
        with running(name) as model:
            yield model
        inside.append(f"leave {name}")

    monkeypatch.setattr(pipe, "running", watched)
    monkeypatch.setattr(jobs, "decode_latents", lambda vae, x0: inside.append("decode") or torch.zeros(1, 3, 64, 64))
    assert recorder.strips(pipe, 64, 64, count=2)[0].size == (128, 64)
    assert inside == ["enter vae", "decode", "decode", "leave vae"]
