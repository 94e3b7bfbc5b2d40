"""benchmarks/compare.py's own bad input: refused in one line before any checkpoint is built or worker started
(the measurements themselves need the full-size model, so they are not tests)."""

import re
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
        (["--compile-reference", "--offload", "sequential"], "compiling does not combine with --offload sequential"),
    ],
)
def test_bad_options_are_refused_by_the_parser(args, message, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(args)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("native", [False, True])
def test_the_dtype_is_one_both_sides_run_natively(native, monkeypatch, capsys):
    # Without native bf16 mirage runs fp32 while diffusers would run emulated bf16, ~100x slower: no comparison.
    monkeypatch.setattr(compare, "native_bf16", lambda device: native)
    assert compare.parse_args([]).dtype == ("bf16" if native else "fp32")
    if not native:
        with pytest.raises(SystemExit):
            compare.parse_args(["--dtype", "bf16"])
        assert "this cpu has no native bf16" in capsys.readouterr().err


def test_compiled_components_need_a_second_run(capsys):
    assert compare.parse_args(["--compile", "--repeats", "1", "--parts", "e2e"]).compile  # e2e times cold and warm
    with pytest.raises(SystemExit):
        compare.parse_args(["--compile", "--repeats", "1", "--parts", "step"])
    assert "a compiled model's first run compiles" in capsys.readouterr().err


def test_every_worker_starts_with_empty_compile_caches(tmp_path, monkeypatch):
    seen = []

    def run(cmd, env, **kwargs):
        caches = [Path(env["TORCHINDUCTOR_CACHE_DIR"]), Path(env["TRITON_CACHE_DIR"])]
        seen.append((caches, caches[0].parent.is_dir() and not any(caches[0].parent.iterdir())))
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(subprocess, "run", run)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            compare.run_worker(tmp_path, "ours", "step", 5, None)
    (first, empty_first), (second, empty_second) = seen
    assert empty_first and empty_second and first[0].parent != second[0].parent  # a fresh folder each time...
    assert not first[0].parent.exists()  # ...deleted once the worker is done


def test_compile_reference_compiles_what_compile_compiles_in_ours(tmp_path, monkeypatch):
    from tiny_checkpoint import tiny_prx_pipeline

    monkeypatch.setattr(torch.nn.Module, "compile", lambda module: setattr(module, "compiled", True))
    pipe = tiny_prx_pipeline(tmp_path)
    parts = {"transformer": pipe.transformer.blocks, "text_encoder": pipe.text_encoder.layers, "vae": [pipe.vae.decoder]}
    for name, modules in parts.items():
        assert compare.as_asked({}, getattr(pipe, name), name) is getattr(pipe, name)
        assert not any(getattr(module, "compiled", False) for module in modules)
        compare.as_asked({"compile_reference": True}, getattr(pipe, name), name)
        assert all(module.compiled for module in modules) and len(modules) > 0


def test_the_cuda_report_gives_allocated_and_reserved_memory():
    e2e = lambda seconds, allocated, reserved: {  # noqa: E731
        "wall": {"e2e": seconds, "generate": seconds / 10}, "cpu": {"e2e": seconds, "generate": seconds / 10},
        "peak_memory": allocated, "peak_reserved": reserved, "dtypes": {}, "outputs": {"images": torch.zeros(1, 3, 8, 8)},
    }  # fmt: skip
    settings = dict(device="cuda", dtype="bf16", resolution=512, vae="flux", guidance=5.0, steps=28, repeats=2, rounds=1)
    results = {"reference": {"e2e": e2e(3.0, 8e9, 9e9)}, "ours": {"e2e": e2e(4.0, 6e9, 6.3e9)}}
    table = compare.report(settings, dict(prompt_tokens=34, negative_tokens=1), results, (0.0, 0.0))
    assert re.search(r"\n  peak GPU memory, e2e process +8.00GB +6.00GB +0.75\n", table)
    assert re.search(r"\n  peak GPU memory reserved, e2e process +9.00GB +6.30GB +0.70$", table)


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
