"""sample.py as a user runs it: a subprocess on a tiny converted checkpoint."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_sample(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_writes_pngs_with_their_settings(mirage_flux, tmp_path):
    result = run_sample(
        "--prompt", "a red fox", "--weights", mirage_flux, "--steps", 2, "--num-images", 2, "--seed", 3,
        "--height", 200, "--width", 300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    paths = [tmp_path / "outputs/00000.png", tmp_path / "outputs/00001.png"]
    assert result.stdout.strip().splitlines()[-1].startswith(f"wrote {Path('outputs/00000.png')}")
    images = [Image.open(p) for p in paths]
    assert all(image.size == (300, 200) and image.mode == "RGB" for image in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # two draws of one seed's batch
    settings = json.loads(images[1].text["mirage"])
    assert images[1].text["prompt"] == "a red fox"
    assert (settings["seed"], settings["steps"], settings["image_index"]) == (3, 2, 1)
    assert (settings["device"], settings["dtype"]) == ("cpu", "fp32")  # what ran (the defaults here), not unset flags

    again = run_sample("--prompt", "a red fox", "--weights", mirage_flux, "--steps", 2, "--seed", 3, cwd=tmp_path)
    assert again.returncode == 0 and (tmp_path / "outputs/00002.png").is_file()  # numbered on, nothing overwritten


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", 0], "--steps must be at least 1"),
        (["--guidance", 0.5], "--guidance must be a number >= 1"),
        (["--height", 250, "--width", 256, "--no-binning"], "multiples of 16"),
        (["--output", "taken.png"], "taken.png exists"),
        (["--output", "taken.png/x.png"], "taken.png"),  # a folder that cannot be made
        (["--weights", "empty"], "not a converted checkpoint"),
        (["--weights", "truncated"], "not a readable safetensors file"),
        (["--cuda-graph", "--device", "cpu"], "CUDA graphs need a CUDA device"),
        (["--guidance", "nan"], "--guidance must be a number >= 1"),
        (["--seed", -1], "--seed must be >= 0"),
        (["--seed", 2**70], "seeds must be in [0, 2**64)"),
        (["--height", 100_000], "height and width must be 1 to 16384 pixels"),
        (["--output", "cat.jpg"], "must end in .png"),
        (["--output", "new/folder/cat.png", "--weights", "empty"], "not a converted checkpoint"),  # no folder made
        (["--prompt", "caf\udce9"], "--prompt holds bytes that are not UTF-8"),
        (["--device", "meta"], "device 'meta' is not one mirage runs on"),
        (["--device", "bogus"], "device 'bogus' is not one mirage runs on: use cuda, mps or cpu"),  # not torch's list
        (["--dtype", "f32"], "argument --dtype: invalid choice: 'f32'"),  # argparse's errors: one line too
        (["--steps", "abc"], "argument --steps: invalid int value: 'abc' (see --help)"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(mirage_flux, tmp_path, args, message):
    (tmp_path / "taken.png").write_bytes(b"mine")
    (tmp_path / "empty").mkdir()
    shutil.copytree(mirage_flux, tmp_path / "truncated")
    weights = tmp_path / "truncated/transformer.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = sorted(tmp_path.rglob("*"))
    args = args if "--weights" in args else [*args, "--weights", mirage_flux]
    result = run_sample("--prompt", "a cat", *args, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert (tmp_path / "taken.png").read_bytes() == b"mine"
    assert sorted(tmp_path.rglob("*")) == before  # no image, partial file or empty folder left behind


def test_inf_or_nan_output_is_one_line_naming_the_model(mirage_flux, tmp_path):
    result = run_sample("--prompt", "a cat", "--weights", mirage_flux, "--steps", 2, "--guidance", "1e30", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("sample.py: error: the transformer's latents hold inf/NaN in float32: check the weights")
    assert not (tmp_path / "outputs").exists()


def test_without_weights_it_says_how_to_get_them(tmp_path, monkeypatch):
    import sample

    monkeypatch.setattr(sample, "WEIGHTS_DIRS", (tmp_path / "weights",))
    (tmp_path / "weights" / "empty").mkdir(parents=True)  # a folder without config.json is no checkpoint
    with pytest.raises(FileNotFoundError, match=f"looked in {tmp_path / 'weights'}\\)") as error:
        sample.find_weights(None)
    assert "convert_weights.py Photoroom/prx-512-t2i-sft" in str(error.value)


def test_weights_are_looked_for_where_you_are_then_beside_sample_py(tmp_path, monkeypatch):
    import sample

    here, beside = tmp_path / "here", tmp_path / "repo"
    hidden = here / "weights" / ".mine.tmp-123"  # a conversion's, whose config.json is written last
    for folder in (here / "weights" / "mine", hidden, beside / "weights" / "a", beside / "weights" / "b"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    monkeypatch.chdir(here)  # where convert_weights.py wrote weights/mine
    monkeypatch.setattr(sample, "WEIGHTS_DIRS", (Path("weights"), beside / "weights"))
    assert sample.find_weights(None) == here / "weights" / "mine"
    (here / "weights" / "mine" / "config.json").unlink()
    with pytest.raises(ValueError, match=f"{beside / 'weights'} holds 2 checkpoints: choose one with --weights"):
        sample.find_weights(None)


def test_names_taken_meanwhile_are_never_overwritten(tmp_path, monkeypatch):
    """Another run into outputs/ may write the numbers this one chose while its images were made: the names are
    taken again, atomically, just before writing."""
    import sample

    monkeypatch.chdir(tmp_path)
    options = sample.Options(prompt="a cat", num_images=2, save_trajectory=True)
    chosen = sample.output_paths(None, 2, trajectory=True)
    assert [p.name for p in chosen] == ["00000.png", "00001.png", "00000.trajectory.png", "00001.trajectory.png"]
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "00001.png").write_bytes(b"another run's image")
    claimed = sample.claim(chosen, options)
    assert [p.name for p in claimed] == ["00002.png", "00003.png", "00002.trajectory.png", "00003.trajectory.png"]
    assert (tmp_path / "outputs" / "00001.png").read_bytes() == b"another run's image"
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == sorted(["00001.png", *(p.name for p in claimed)])
    strip = tmp_path / "outputs" / "00004.trajectory.png"  # a strip alone, or a link to nothing: taken names too
    strip.symlink_to(tmp_path / "nowhere.png")
    assert [p.name for p in sample.claim(chosen, options)][:2] == ["00005.png", "00006.png"]
    given = sample.Options(prompt="a cat", output=tmp_path / "cat.png", num_images=2)
    paths = sample.output_paths(given.output, 2)
    paths[1].write_bytes(b"written meanwhile")
    with pytest.raises(FileExistsError, match="cat_1.png was written meanwhile by something else: choose another"):
        sample.claim(paths, given)
    assert paths[1].read_bytes() == b"written meanwhile" and not paths[0].exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "a cat", "--num-images", "0"], "--num-images must be at least 1, got 0"),
        (["--prompt", "a cat", "--height", "0"], "--height must be positive, got 0"),  # not 0 read as "unset"
        (["--prompt", "a cat", "--width", "0"], "--width must be positive, got 0"),
        (["--prompt", "a cat", "--guidance", "inf"], "--guidance must be a number >= 1"),
        (["--prompt", "a cat", "--negative-prompt", "caf\udce9"], "--negative-prompt holds bytes that are not UTF-8"),
        (["--prompts-file", "p.txt", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ],
)
def test_bad_flags_are_refused_before_anything_is_read(args, message):
    import sample

    with pytest.raises(ValueError, match=re.escape(message)):
        sample.parse_options(args)


def test_a_claim_stopped_partway_leaves_no_empty_file(tmp_path, monkeypatch):
    import sample

    paths = [tmp_path / "cat.png", tmp_path / "cat_1.png"]
    open_file = Path.open

    def stopped_at_the_second(path, *args, **kwargs):  # Ctrl-C, or a folder that refuses the second name
        if path == paths[1]:
            raise KeyboardInterrupt
        return open_file(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        sample.claim(paths, sample.Options(prompt="a cat", output=paths[0], num_images=2))
    assert not list(tmp_path.iterdir())


def test_output_names_in_capitals_and_links_to_nothing(tmp_path):
    import sample

    assert sample.parse_options(["--prompt", "a cat", "--output", "CAT.PNG"]).output == Path("CAT.PNG")
    link = tmp_path / "cat.png"
    link.symlink_to(tmp_path / "nowhere.png")  # refused now, not by claim() after sampling
    with pytest.raises(FileExistsError, match="cat.png exists: choose another --output"):
        sample.output_paths(link, 1)


def test_unset_steps_guidance_and_seed_are_the_checkpoints_and_random(prx_flux, tmp_path, monkeypatch):
    import convert_weights
    import sample

    convert_weights.main([str(prx_flux), str(tmp_path / "weights"), "--steps", "1", "--guidance", "2.5"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sample.random.SystemRandom, "randrange", lambda self, stop: stop - 1)  # the last one drawable
    sample.main(["--prompt", "a cat", "--weights", str(tmp_path / "weights"), "--height", "64", "--width", "64"])
    made_with = json.loads(Image.open(tmp_path / "outputs/00000.png").text["mirage"])
    assert (made_with["steps"], made_with["guidance"], made_with["seed"]) == (1, 2.5, 2**31 - 1)


def test_prompt_is_refused_under_torchrun(monkeypatch):
    import sample

    monkeypatch.setenv("WORLD_SIZE", "2")  # each process would make the same images under the same names
    with pytest.raises(ValueError, match="--prompt runs in one process: with torchrun, give --prompts-file"):
        sample.parse_options(["--prompt", "a cat"])


def test_output_folders_are_checked_without_being_made(tmp_path):
    import mirage

    (tmp_path / "file.png").write_bytes(b"mine")
    mirage.check_writable(tmp_path / "a" / "b", "--outdir")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'file.png'} is a file, not a folder: choose another --outdir"):
        mirage.check_writable(tmp_path / "file.png" / "sub", "--outdir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.png"]


@pytest.mark.parametrize("script", ["sample", "convert_weights"])
def test_huge_pages_are_asked_for_before_torch_is_imported(script):
    """PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first large CPU tensor: the scripts set it before torch loads."""
    watch = f"""
import importlib.abc, os, sys
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            print("torch imported with THP_MEM_ALLOC_ENABLE =", os.environ.get("THP_MEM_ALLOC_ENABLE"))
            sys.meta_path.remove(self)
sys.meta_path.insert(0, Watch())
import {script}
import mirage.pipeline  # what sample.py imports once its flags are checked
"""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    run = subprocess.run([sys.executable, "-c", watch], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout == "torch imported with THP_MEM_ALLOC_ENABLE = 1\n", run.stderr[-2000:]
    run = subprocess.run([sys.executable, "-c", watch], cwd=ROOT, env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.stdout == "torch imported with THP_MEM_ALLOC_ENABLE = 0\n"  # the environment's own choice stays


INTERRUPTED = """
import os, runpy, signal, sys, time
import torch
from mirage.pipeline import MiragePipeline

def interrupted(*args, **kwargs):  # stopped while the images are made
    if how == "sigterm":  # kill, timeout, docker stop
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    raise {
        "ctrl-c": KeyboardInterrupt(), "memory": MemoryError(),
        "allocator": RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1048576000 bytes"),
        "cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        "mps": RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB)"),
    }[how]

MiragePipeline.__call__ = interrupted
how, sys.argv = sys.argv[1], sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

OUT_OF_MEMORY = "out of memory: try a smaller --height/--width, fewer --num-images or a smaller --batch-size"


@pytest.mark.parametrize(
    "how, message",
    [
        ("ctrl-c", "sample.py: interrupted: images finished so far are written, none half-written"),
        ("sigterm", "sample.py: interrupted: images finished so far are written, none half-written"),
        ("memory", f"sample.py: error: {OUT_OF_MEMORY}"),
        ("allocator", f"sample.py: error: {OUT_OF_MEMORY}"),
        ("cuda", f"sample.py: error: {OUT_OF_MEMORY}"),
        ("mps", f"sample.py: error: {OUT_OF_MEMORY}"),
    ],
)
def test_ctrl_c_and_out_of_memory_are_one_line(mirage_flux, tmp_path, how, message):
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPTED, how, ROOT / "sample.py", "--prompt", "a cat", "--weights", mirage_flux],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [message], result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only Linux bounds a CPU's memory (macOS grows swap)")
def test_more_images_than_memory_can_hold_are_refused_in_one_line(mirage_flux, tmp_path):
    # Left to run, the OS would kill it with no message. Even the tiny model's MLP would hold 12500 GiB here.
    result = run_sample(
        "--prompt", "a cat", "--weights", mirage_flux, "--num-images", 100_000, "--height", 4096, "--width", 4096,
        "--no-binning", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert re.fullmatch(
        r"sample.py: error: 100000 images at once, generated at 4096x4096 px \(height x width\), need at least "
        r"12500.0 GiB, more than the [\d.]+ GiB this cpu can use: make fewer images per call, or smaller ones "
        r"\(sample.py: fewer --num-images, or a smaller --batch-size\)\n", result.stderr
    ), result.stderr  # fmt: skip
    assert not (tmp_path / "outputs").exists()


def test_a_run_stopped_while_writing_leaves_no_empty_file(mirage_flux, tmp_path, monkeypatch):
    import sample
    from mirage import jobs

    monkeypatch.chdir(tmp_path)
    write_png = jobs.write_png

    def write_one_then_stop(image, path, settings):
        if path.name != "00000.png":
            raise KeyboardInterrupt  # Ctrl-C after the first image is written
        write_png(image, path, settings)

    monkeypatch.setattr(jobs, "write_png", write_one_then_stop)
    with pytest.raises(KeyboardInterrupt):
        sample.main(["--prompt", "a cat", "--weights", str(mirage_flux), "--steps", "2", "--num-images", "2"])
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["00000.png"]  # not 00001.png, empty
    assert Image.open(tmp_path / "outputs" / "00000.png").size == (256, 256)


def test_a_run_into_the_same_folder_meanwhile_keeps_its_image(mirage_flux, tmp_path, monkeypatch):
    import sample
    from mirage.pipeline import MiragePipeline

    monkeypatch.chdir(tmp_path)
    call = MiragePipeline.__call__

    def another_run_writes_first(self, *args, **kwargs):  # while these images are made
        images = call(self, *args, **kwargs)
        (tmp_path / "outputs").mkdir()
        (tmp_path / "outputs" / "00000.png").write_bytes(b"another run's image")
        return images

    monkeypatch.setattr(MiragePipeline, "__call__", another_run_writes_first)
    sample.main(["--prompt", "a cat", "--weights", str(mirage_flux), "--steps", "2"])
    assert (tmp_path / "outputs" / "00000.png").read_bytes() == b"another run's image"
    assert Image.open(tmp_path / "outputs" / "00001.png").size == (256, 256)


def test_a_negative_prompt_without_guidance_is_pointed_out(mirage_flux, tmp_path, monkeypatch, capsys):
    import sample

    monkeypatch.chdir(tmp_path)
    base = ["--prompt", "a cat", "--weights", str(mirage_flux), "--steps", "1", "--negative-prompt", "blurry"]
    sample.main(base + ["--guidance", "1"])  # as distilled checkpoints default to
    note = "note: --negative-prompt is not used with guidance 1 (it acts through guidance > 1)"
    assert note in capsys.readouterr().out
    sample.main(base + ["--guidance", "2"])
    assert "note:" not in capsys.readouterr().out


def test_stop_signals_end_as_ctrl_c_does_and_nohup_still_works():
    import signal

    import mirage

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts a program
        mirage.stop_on_signals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        mirage.stop_on_signals()
        for sig in saved:
            with pytest.raises(KeyboardInterrupt):
                signal.getsignal(sig)(sig, None)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
