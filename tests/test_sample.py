"""sample.py as a user runs it: a subprocess on a tiny converted checkpoint."""

import json
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

    again = run_sample("--prompt", "a red fox", "--weights", mirage_flux, "--steps", 2, "--seed", 3, cwd=tmp_path)
    assert again.returncode == 0 and (tmp_path / "outputs/00002.png").is_file()  # numbered on, nothing overwritten


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", 0], "--steps must be at least 1"),
        (["--guidance", 0.5], "--guidance must be >= 1"),
        (["--height", 250, "--width", 256, "--no-binning"], "multiples of 16"),
        (["--output", "taken.png"], "taken.png exists"),
        (["--output", "taken.png/x.png"], "taken.png"),  # a folder that cannot be made
        (["--weights", "empty"], "not a converted checkpoint"),
        (["--weights", "truncated"], "not a readable safetensors file"),
        (["--cuda-graph", "--device", "cpu"], "CUDA graphs need a CUDA device"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(mirage_flux, tmp_path, args, message):
    (tmp_path / "taken.png").write_bytes(b"mine")
    (tmp_path / "empty").mkdir()
    shutil.copytree(mirage_flux, tmp_path / "truncated")
    weights = tmp_path / "truncated/transformer.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = args if "--weights" in args else [*args, "--weights", mirage_flux]
    result = run_sample("--prompt", "a cat", *args, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert (tmp_path / "taken.png").read_bytes() == b"mine"


def test_without_weights_it_says_how_to_get_them(tmp_path, monkeypatch):
    import sample

    monkeypatch.setattr(sample, "WEIGHTS_DIR", tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="convert_weights.py Photoroom/prx-512-t2i-sft"):
        sample.find_weights(None)
