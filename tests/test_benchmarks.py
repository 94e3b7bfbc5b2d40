"""benchmarks/compare.py's own bad input: refused in one line before any checkpoint is built or worker started
(the measurements themselves need the full-size model, so they are not tests)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "meta"], "--device meta: device 'meta' is not one mirage runs on"),
        (["--device", "bogus"], "--device bogus: Expected one of"),
        (["--steps", "0"], "--steps, --repeats, --rounds >= 1"),
        (["--resolution", "100"], "--resolution must be a multiple of 16"),
        (["--cuda-graph"], "--cuda-graph needs --device cuda"),
    ],
)
def test_bad_options_are_refused_by_the_parser(args, message, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(args)
    assert message in capsys.readouterr().err


def test_a_device_this_torch_lacks_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        compare.parse_args(["--device", "cuda"])
    assert "this torch build sees no cuda device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "failure, message",
    [
        (subprocess.CalledProcessError(1, "worker"), "the reference text worker failed \\(exit 1; its error is above\\)"),
        (subprocess.TimeoutExpired("worker", 5), "the reference text worker ran over --timeout 5 s"),
    ],
)
def test_a_failed_worker_is_one_line(failure, message, tmp_path, monkeypatch):
    def run(*args, **kwargs):
        raise failure

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(RuntimeError, match=message):
        compare.run_worker(tmp_path, "reference", "text", 5, None)
