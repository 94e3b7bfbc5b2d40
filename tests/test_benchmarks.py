"""The benchmark scripts: bad options refused in one line before any checkpoint is built or worker started, and
a whole compare.py run on the tiny checkpoints (workers in this process), whose two sides must compute the same
thing. What the full-size runs measure (time, memory) is the benchmark's output, not a test."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import checkpoint  # noqa: E402
import common  # noqa: E402
import compare  # noqa: E402
import denoise_loop  # noqa: E402
import profile_step  # noqa: E402

from mirage import memory  # noqa: E402


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "meta"], "--device meta: device 'meta' is not one mirage runs on"),
        (["--device", "bogus"], "--device bogus: device 'bogus' is not one mirage runs on"),
        (["--steps", "0"], "--steps, --repeats, --rounds, --timeout >= 1"),
        (["--timeout", "0"], "--steps, --repeats, --rounds, --timeout >= 1"),
        (["--guidance", "nan"], "need a finite --guidance > 1"),
        (["--guidance", "1"], "need a finite --guidance > 1"),
        (["--guidance", "inf"], "need a finite --guidance > 1"),
        (["--rounds", "0"], "--steps, --repeats, --rounds, --timeout >= 1"),
        (["--prompt-tokens", "1"], "--prompt-tokens must be in [2, 256] and --negative-tokens in [1, 256]"),
        (["--negative-tokens", "0"], "--prompt-tokens must be in [2, 256] and --negative-tokens in [1, 256]"),
        (["--resolution", "100"], "--resolution must be a positive multiple of 16 with the flux VAE"),
        (["--resolution", "0"], "--resolution must be a positive multiple of 16"),
        (["--resolution", "-16"], "--resolution must be a positive multiple of 16"),
        (["--vae", "dc-ae", "--resolution", "48"], "--resolution must be a positive multiple of 32 with the dc-ae VAE"),
        (["--cuda-graph"], "--cuda-graph needs --device cuda"),
        (["--device", "cpu:0", "--cuda-graph"], "--cuda-graph needs --device cuda"),
        (["--offload", "model"], "--offload needs --device cuda"),
        (["--compile-reference", "--offload", "sequential"], "compiling does not combine with --offload sequential"),
        (["--compile", "--offload", "sequential"], "compiling does not combine with --offload sequential"),
    ],
)
def test_bad_options_are_refused_by_the_parser(args, message, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(args)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "main, args",
    [(denoise_loop.main, ["--device", "cpu", "--modes", "eager"]), (profile_step.main, [])],
    ids=["denoise_loop", "profile_step"],
)
@pytest.mark.parametrize(
    "bad, message",
    [
        (["--device", "bogus"], "--device bogus: device 'bogus' is not one mirage runs on"),
        (["--resolution", "24"], "--resolution must be a positive multiple of 16"),
        (["--cache", "/proc/no-such-cache"], "--cache /proc/no-such-cache cannot be used"),
    ],
)
def test_the_other_scripts_refuse_bad_options_in_one_line(main, args, bad, message, capsys):
    with pytest.raises(SystemExit):
        main(args + bad)
    assert message in capsys.readouterr().err


def test_the_device_is_normalised_and_mps_is_not_timed(monkeypatch, capsys):
    assert compare.parse_args(["--device", "cpu:0"]).device == "cpu"  # one name for reports and safetensors
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(SystemExit):  # the timer synchronises CUDA only, and the report knows RSS and CUDA memory
        compare.parse_args(["--device", "mps"])
    assert "--device mps: the benchmarks run on cpu or cuda" in capsys.readouterr().err


@pytest.mark.parametrize("native_bf16, native_fp16", [(False, False), (True, False), (True, True)])
def test_the_dtype_is_one_both_sides_run_natively(native_bf16, native_fp16, monkeypatch, capsys):
    # Without native kernels mirage runs fp32 while diffusers would run slow emulated ones: no comparison.
    natives = {torch.float32: True, torch.bfloat16: native_bf16, torch.float16: native_fp16}
    monkeypatch.setattr(common, "native", lambda dtype, device: natives[dtype])
    assert compare.parse_args([]).dtype == ("bf16" if native_bf16 else "fp32")
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if natives[dtype]:
            assert compare.parse_args(["--dtype", name]).dtype == name
        else:
            with pytest.raises(SystemExit):
                compare.parse_args(["--dtype", name])
            assert f"this cpu has no native {name} kernels" in capsys.readouterr().err


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


def test_cuda_graphs_do_not_combine_with_sequential_offload(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        compare.parse_args(["--device", "cuda", "--dtype", "fp32", "--cuda-graph", "--offload", "sequential"])
    assert "--cuda-graph needs --device cuda and no --offload sequential" in capsys.readouterr().err


def test_offload_needs_accelerate_for_the_reference(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(compare.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        compare.parse_args(["--device", "cuda", "--dtype", "fp32", "--offload", "model"])
    assert "diffusers offloads with accelerate, which is not installed" in capsys.readouterr().err


# ---- measuring ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vae", ["flux", "dc-ae"])
def test_a_whole_run_compares_the_same_computation(vae, request, tmp_path, monkeypatch, capsys):
    """compare.py end to end on the tiny checkpoints, each worker run in this process: every part's two sides
    (text encoding, one CFG step, one decode, a 2-step generation) must agree as the parity tests require."""
    suffix = "flux" if vae == "flux" else "dcae"
    prx, mirage = request.getfixturevalue(f"prx_{suffix}"), request.getfixturevalue(f"mirage_{suffix}")
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, target in ((f"prx-{vae}", prx), (f"mirage-{vae}", mirage), ("t5gemma-2b-encoder", prx / "text_encoder")):
        (cache / name).symlink_to(target)  # what ensure_checkpoint finds, so it builds nothing
    monkeypatch.setattr(compare, "quiet_oracles", lambda: None)  # global settings of this test process: left alone
    monkeypatch.setattr(memory, "is_ample", lambda device, weight_bytes: False)  # ours frees its text encoder
    run = subprocess.run  # platform.processor() runs uname with it

    def run_here(cmd, **kwargs):  # a worker's command is [python, compare.py, --worker, ...]
        return compare.main(cmd[2:]) if "--worker" in cmd else run(cmd, **kwargs)

    monkeypatch.setattr(subprocess, "run", run_here)
    compare.main(["--cache", str(cache), "--vae", vae, "--resolution", "32", "--steps", "2", "--prompt-tokens", "12",
                  "--repeats", "1", "--dtype", "fp32"])  # fmt: skip
    table = capsys.readouterr().out
    rows = {
        "text encoding": r"text encoding \(prompt \+ negative\)",
        "step": r"one denoising step \(CFG, 32 px\)",
        "decode": r"VAE decode",
        "generation": r"load \+ generate \(2 steps\)",
    }
    for name, label in rows.items():
        match = re.search(rf"^{label} .* (\S+) (rel|max)", table, re.M)
        assert match, f"no {name} row with a difference in:\n{table}"
        assert float(match[1]) < 2e-5, f"the two sides' {name} differ by {match[1]}:\n{table}"
    assert re.search(r"^projected: text \+ 2 steps \+ decode ", table, re.M)
    assert re.search(r"^  import \(after torch; not in the above\) +[\d.]+ m?s +[\d.]+ m?s ", table, re.M), table
    assert re.search(r"^note: ours freed its text encoder", table, re.M), table


def test_imports_are_timed_in_a_fresh_process_and_the_text_encoders_fate_is_noted(monkeypatch):
    commands, run = [], subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: commands.append(cmd) or run(cmd, **kwargs))
    timer = common.Timer(torch.device("cpu"), repeats=1)
    compare.time_import("ours", timer)
    ((python, flag, code, root),) = commands
    assert (python, flag, root) == (sys.executable, "-c", str(compare.ROOT))
    assert code.index("import sys, time, torch") < code.index("perf_counter()") < code.index(compare.IMPORTS["ours"])
    assert timer.wall["import"] > 0 and timer.cpu["import"] > 0
    for kept, word in ((True, "kept"), (False, "freed")):
        (note,) = compare.text_encoder_note({"ours": {"e2e": {"text_encoder_kept": kept}}})
        assert note.startswith(f"note: ours {word} its text encoder")
    assert compare.text_encoder_note({"ours": {"step": {}}}) == []


def test_difference_compares_the_same_positions():
    real = torch.tensor([[False, False, True], [False, True, True]])  # [2, 3]: ours, padded to the longer prompt
    ours_text = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    ref_text = torch.cat([torch.full((2, 5, 2), 99.0), ours_text], dim=1)  # the reference pads to 8, on the left
    ref_mask = torch.cat([torch.zeros(2, 5, dtype=torch.bool), real], dim=1)
    ref_text[1, -1, 0] += 0.5  # a real token's value: the only difference
    ref_text[0, -2, 0] += 100.0  # a padded position's: not compared
    ours, ref = {"text": ours_text, "text_mask": real}, {"text": ref_text, "text_mask": ref_mask}
    assert compare.difference("text", ours, ref) == f"{0.5 / 11:.2g} rel"  # max |ref| at real tokens is 11
    ref["text_mask"] = torch.roll(ref_mask, 1, dims=1)
    assert compare.difference("text", ours, ref) == "the two sides tokenised differently"
    ref["text_mask"] = ref_mask.clone()
    ref["text_mask"][0, 4] = True  # a real token of the reference's left of ours' columns: ours lost it
    assert compare.difference("text", ours, ref) == "the two sides tokenised differently"
    images = torch.zeros(1, 3, 2, 2)
    e2e = compare.difference("e2e", {"images": images + 0.25}, {"images": images})
    assert e2e == "0.25 max, 0.25 mean |px| in [0, 1]"
    one_pixel = images.clone()
    one_pixel[0, 0, 0, 0] = 0.6
    assert compare.difference("e2e", {"images": one_pixel}, {"images": images}) == "0.6 max, 0.05 mean |px| in [0, 1]"
    assert compare.difference("vae", {"decoded": images + 1}, {"decoded": images - 3}) == "1.3 rel"  # 4 / max(1, 3)
    small = compare.difference("vae", {"decoded": images + 0.5}, {"decoded": images + 0.25})
    assert small == "0.25 rel"  # 0.25 / max(1, 0.25)


def test_the_report_gives_ratios_speedups_and_the_projection(monkeypatch):
    def result(seconds: dict, peak: float) -> dict:
        outputs = {"text": torch.zeros(2, 3, 4), "text_mask": torch.ones(2, 3, dtype=torch.bool),
                   "velocity": torch.zeros(1, 4), "decoded": torch.zeros(1, 4)}  # fmt: skip
        return {"wall": seconds, "cpu": seconds, "peak_memory": peak, "dtypes": {}, "outputs": outputs}

    settings = dict(device="cpu", dtype="fp32", resolution=512, vae="flux", guidance=5.0, steps=28, repeats=2, rounds=1,
                    mirage="unused")  # fmt: skip
    reference = {"text": result({"text": 8.0}, 4e9), "step": result({"step": 2.0}, 2e9),
                 "vae": result({"vae": 3.0}, 1e9)}  # fmt: skip
    ours = {"text": result({"text": 2.0}, 3e9), "step": result({"step": 1.6, "text side": 0.5}, 1e9),
            "vae": result({"vae": 2.0}, 1e9)}  # fmt: skip
    monkeypatch.setattr(compare, "step_flops", lambda settings, inputs: 4e12)  # it reads a checkpoint: not tested here
    inputs, results = {"prompt_tokens": 34, "negative_tokens": 1}, {"reference": reference, "ours": ours}
    table = compare.report(settings, inputs, results, (0.0, 0.0))
    assert re.search(r"\ntext encoding \(prompt \+ negative\) +8\.00 s +2\.00 s +0\.25 +4\.00x +0\.25  0 rel\n", table)
    assert re.search(r"\n  transformer text side \(once per call\) +- +500\.0 ms\n", table)
    assert re.search(r"\none denoising step \(CFG, 512 px\) +2\.00 s +1\.60 s +0\.80 +1\.25x", table)
    assert re.search(r"\n  model TFLOP/s \(4\.00 TFLOP a step\) +2 +2\.5\n", table)
    assert re.search(r"\n  peak RSS, text process +4\.00GB +3\.00GB +0\.75\n", table)
    # 8 + 28 x 2 + 3 = 67 s against 2 + 0.5 + 28 x 1.6 + 2 = 49.3 s
    assert re.search(r"\nprojected: text \+ 28 steps \+ decode +67\.00 s +49\.30 s +0\.74 +1\.36x$", table)


def test_the_cpu_column_is_the_ratio_of_cpu_times_and_the_dtype_note_names_changed_models():
    outputs = {"text": torch.zeros(2, 3, 4), "text_mask": torch.ones(2, 3, dtype=torch.bool)}
    ref = {"wall": {"text": 8.0}, "cpu": {"text": 4.0}, "outputs": outputs}
    ours = {"wall": {"text": 2.0}, "cpu": {"text": 3.0}, "outputs": outputs}
    (row,) = compare.part_rows("text", dict(device="cpu"), {}, ref, ours)
    assert re.search(r" +8\.00 s +2\.00 s +0\.25 +4\.00x +0\.75  0 rel$", row)  # CPU: 3 / 4
    results = {"ours": {"step": {"dtypes": {"transformer": "bfloat16"}}, "vae": {"dtypes": {"vae": "float32"}}}}
    note = "note: ours ran vae in float32 (mirage.precision); the reference ran everything in bf16"
    assert compare.dtype_note(dict(dtype="bf16"), results) == [note]
    assert compare.dtype_note(dict(dtype="fp32"), {"ours": {"vae": {"dtypes": {"vae": "float32"}}}}) == []


@pytest.mark.parametrize("vae", ["flux", "dc-ae"])
def test_the_step_flops_are_what_torch_counts_in_the_blocks(vae, request):
    """The TFLOP/s row's count equals torch's own count of the blocks' matmuls, each CFG row run by itself over
    its own prompt (math attention, whose matmuls torch counts): patch size, both rows and their lengths."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mirage.pipeline import MiragePipeline

    folder = request.getfixturevalue("mirage_flux" if vae == "flux" else "mirage_dcae")
    pipe = MiragePipeline.from_pretrained(folder, "cpu", torch.float32)
    transformer, config = pipe.transformer, pipe.config.transformer
    side = 64 // pipe.config.vae.spatial_compression  # a 64 px image's latents
    latents = torch.randn(1, config.in_channels, side, side)
    mod = transformer.modulate(torch.tensor([0.5]), *latents.shape[-2:])

    rows = [transformer.encode_text(torch.randn(1, n, config.context_in_dim)) for n in (7, 3)]  # prompt, negative

    def step() -> int:  # the FLOPs of the two CFG rows' model calls, each over its own prompt
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            for text in rows:
                transformer.forward_modulated(latents, mod, text)
        return counter.get_total_flops()

    whole = step()
    transformer.blocks = torch.nn.ModuleList()  # what is left: the patch embedding and the final layer
    settings, inputs = {"mirage": folder, "resolution": 64}, {"prompt_tokens": 7, "negative_tokens": 3}
    assert compare.step_flops(settings, inputs) == whole - step() > 0


def test_no_projection_without_all_three_components():
    part = {"wall": {"x": 1.0}}
    results = {side: {"text": part, "step": part} for side in compare.SIDES}
    assert compare.projection(dict(steps=28), results) == []


def test_each_run_gets_a_folder_of_its_own(tmp_path, monkeypatch):
    class Now(compare.datetime):  # two runs in the same second
        @classmethod
        def now(cls, tz=None):
            return compare.datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(compare, "datetime", Now)
    monkeypatch.setattr(compare, "ensure_checkpoint", lambda cache, vae: (tmp_path / "prx", tmp_path / "mirage"))
    monkeypatch.setattr(compare, "make_inputs", lambda settings, prompt, negative: {})
    monkeypatch.setattr(compare, "run_worker", lambda *args: {})
    monkeypatch.setattr(compare, "report", lambda *args: "table")
    for _ in range(2):
        compare.main(["--cache", str(tmp_path), "--parts", "step", "--dtype", "fp32"])
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((run / "report.txt").read_text() == "table\n" for run in runs)


def test_the_timer_keeps_each_parts_best_time():
    def busy(seconds):  # CPU time and wall time
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        return "last"

    durations = iter([0.1, 0.0, 0.06])
    timer = common.Timer(torch.device("cpu"), repeats=3)
    assert timer("part", lambda: busy(next(durations))) == "last"
    assert timer.wall["part"] < 0.03 and timer.cpu["part"] < 0.03
    timer("sleep", lambda: time.sleep(0.05), 1)  # wall time without CPU time
    assert timer.wall["sleep"] >= 0.05 and timer.cpu["sleep"] < 0.025


def test_the_timer_synchronises_cuda_around_each_call_and_takes_a_repeats_override(monkeypatch):
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: log.append("sync"))
    timer = common.Timer(torch.device("cuda"), repeats=3)
    timer("part", lambda: log.append("call"), 2)  # queued kernels are timed with the call that launched them
    assert log == ["sync", "call", "sync"] * 2
    log.clear()
    timer("part", lambda: log.append("call"))
    assert log.count("call") == 3


def test_e2e_loads_once_and_on_cuda_times_warm_generations(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    for device, generations in (("cpu", 1), ("cuda", 1 + 3)):
        calls = []
        timer = common.Timer(torch.device(device), repeats=3)
        load = lambda: calls.append("load") or "pipe"  # noqa: E731
        generate = lambda pipe: calls.append(pipe) or "images"  # noqa: E731
        assert compare.time_e2e({"device": torch.device(device)}, timer, load, generate) == {"images": "images"}
        assert calls.count("load") == 1 and calls.count("pipe") == generations
        assert ("generate" in timer.wall) == (device == "cuda")


def test_peak_memory_on_cuda_is_the_peak_allocated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 7e9)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 9e9)  # the report's other row
    assert common.peak_memory(torch.device("cuda")) == 7e9


def test_left_padded_masks_mark_the_last_tokens_of_each_row():
    expected = [[False, False, False, True], [False, True, True, True], [True, True, True, True]]
    assert common.left_padded_mask([1, 3, 4], 4).tolist() == expected


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_peak_memory_is_this_process_peak():
    def resident() -> int:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)[1]) * 1024

    before = resident()
    block = torch.ones(400 * 2**20, dtype=torch.uint8)  # touched: 400 MiB resident
    del block
    assert resident() < before + 200 * 2**20  # freed...
    assert common.peak_memory(torch.device("cpu")) >= before + 380 * 2**20  # ...and still counted in the peak


def test_rounds_merge_into_the_best_times_and_the_highest_peak(tmp_path, monkeypatch):
    rounds = iter([({"step": 2.0}, {"step": 0.5}, 5e9), ({"step": 1.0}, {"step": 1.5}, 3e9)])

    def run(cmd, **kwargs):  # what a worker writes
        wall, cpu, peak = next(rounds)
        (tmp_path / "ours-step.json").write_text(compare.json.dumps({"wall": wall, "cpu": cpu, "peak_memory": peak}))
        torch.save({}, tmp_path / "ours-step.pt")

    monkeypatch.setattr(subprocess, "run", run)
    first = compare.run_worker(tmp_path, "ours", "step", 5, None)
    merged = compare.run_worker(tmp_path, "ours", "step", 5, first)
    assert merged["wall"] == {"step": 1.0} and merged["cpu"] == {"step": 0.5} and merged["peak_memory"] == 5e9


# ---- the full-size checkpoint (never built here) -------------------------------------------------------------


def test_the_full_size_checkpoint_has_the_published_hyper_parameters():
    from mirage.configs import PRX_DCAE, PRX_FLUX, DCAEConfig, FluxVAEConfig, TransformerConfig

    assert FluxVAEConfig.from_diffusers(dict(checkpoint.FLUX_VAE)) == FluxVAEConfig()  # FLUX.1-dev's vae/
    assert DCAEConfig.from_diffusers(dict(checkpoint.DC_AE)) == DCAEConfig()  # dc-ae-f32c32-sana-1.1
    for vae, preset in (("flux", PRX_FLUX), ("dc-ae", PRX_DCAE)):
        assert TransformerConfig.from_diffusers(checkpoint.transformer_config(vae)) == preset


def test_the_full_size_text_encoder_is_the_published_t5gemma_2b_encoder(tmp_path, monkeypatch):
    """save_text_encoder without its 5.2 GB of weights: the module is the encoder half of google/t5gemma-2b-2b-ul2
    (2.61B parameters) and config.json the composite T5GemmaConfig, as Photoroom publishes it, whose encoder is the
    published one (mirage's defaults: 26 layers of 2304, 8 query / 4 key-value heads of 256, MLP 9216, soft-cap 50,
    sliding window 4096, vocabulary 256000)."""
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    from mirage.configs import TextEncoderConfig

    built = []

    def weightless(make, seed):
        with torch.device("meta"):
            built.append(make())
        return SimpleNamespace(save_pretrained=lambda folder: None)

    monkeypatch.setattr(checkpoint, "random_bf16", weightless)
    checkpoint.save_text_encoder(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "t5gemma" and saved["encoder"]["model_type"] == "t5_gemma_module"
    assert TextEncoderConfig.from_transformers(saved) == TextEncoderConfig()
    [encoder] = built
    assert isinstance(encoder, T5GemmaEncoder) and sum(p.numel() for p in encoder.parameters()) == 2_614_341_888


def test_the_full_size_folder_is_laid_out_as_photoroom_publishes_prx_512(tmp_path, monkeypatch):
    """build_prx without its weights: model_index.json of Photoroom/prx-512-t2i (default sample size 512, diffusers'
    class names, the text encoder through `["prx", "T5GemmaEncoder"]`), the scheduler's shift 3.0, the tokenizer's
    256 tokens, which the benchmark's TOKENIZER_MAX_LENGTH mirrors."""
    monkeypatch.setattr(checkpoint, "random_bf16", lambda make, seed: SimpleNamespace(save_pretrained=lambda f: None))
    (tmp_path / "encoder").mkdir()
    checkpoint.build_prx(tmp_path / "prx-dc-ae", "dc-ae", tmp_path / "encoder")
    folder = tmp_path / "prx-dc-ae"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["default_sample_size"] == 512 and index["_class_name"] == "PRXPipeline"
    assert index["text_encoder"] == ["prx", "T5GemmaEncoder"] and index["vae"] == ["diffusers", "AutoencoderDC"]
    assert json.loads((folder / "scheduler/scheduler_config.json").read_text())["shift"] == 3.0
    tokenizer = json.loads((folder / "tokenizer/tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == common.TOKENIZER_MAX_LENGTH == 256
    assert (folder / "text_encoder").resolve() == (tmp_path / "encoder").resolve()


def test_random_weights_keep_activations_at_unit_scale():
    default = torch.get_default_dtype()
    linear = checkpoint.random_bf16(lambda: torch.nn.Linear(1024, 256), seed=0)
    assert torch.get_default_dtype() == default  # bf16 only while building
    assert linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu"
    assert abs(linear.weight.float().std().item() * 1024**0.5 - 1) < 0.05  # N(0, 1 / fan_in)
    assert abs(linear.bias.float().std().item() - 0.5) < 0.1


def test_an_interrupted_conversion_is_converted_again(tmp_path, monkeypatch):
    converted = []
    monkeypatch.setattr(checkpoint, "save_text_encoder", lambda folder: pytest.fail("the encoder is there"))
    monkeypatch.setattr(checkpoint, "build_prx", lambda *args: pytest.fail("the PRX folder is there"))
    monkeypatch.setitem(sys.modules, "convert_weights", SimpleNamespace(main=converted.append))  # what it imports
    built_but_not_converted(tmp_path)
    (tmp_path / "mirage-flux").mkdir()  # a conversion that stopped before writing config.json
    assert checkpoint.ensure_checkpoint(tmp_path, "flux") == (tmp_path / "prx-flux", tmp_path / "mirage-flux")
    assert converted == [[str(tmp_path / "prx-flux"), str(tmp_path / "mirage-flux"), "--force"]]
    (tmp_path / "mirage-flux" / "config.json").write_text("{}")
    checkpoint.ensure_checkpoint(tmp_path, "flux")
    assert len(converted) == 1


def built_but_not_converted(cache: Path) -> None:
    """The markers ensure_checkpoint looks for: the encoder and the PRX folder are built, nothing is converted."""
    for folder, marker in (("t5gemma-2b-encoder", "config.json"), ("prx-flux", "model_index.json")):
        (cache / folder).mkdir(parents=True)
        (cache / folder / marker).write_text("{}")


@pytest.mark.parametrize("setting", [None, "0"])
def test_converting_leaves_the_workers_environment_as_it_was(setting, tmp_path, monkeypatch):
    # convert_weights.py asks for 2 MB pages (THP_MEM_ALLOC_ENABLE=1) when imported, and the workers inherit this
    # process's environment: a run that converted must not measure under another setting than the runs after it.
    pages = "os.environ['THP_MEM_ALLOC_ENABLE'] = '1'"
    (tmp_path / "convert_weights.py").write_text(f"import os\n{pages}\n\ndef main(argv):\n    {pages}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "convert_weights", None)  # undone last: the module as it was, or none
    monkeypatch.delitem(sys.modules, "convert_weights")  # so that the import runs the stand-in's module code
    if setting is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", setting)
    cache = tmp_path / "cache"
    built_but_not_converted(cache)
    checkpoint.ensure_checkpoint(cache, "flux")
    assert sys.modules["convert_weights"].__file__ == str(tmp_path / "convert_weights.py")  # it did convert
    assert os.environ.get("THP_MEM_ALLOC_ENABLE") == setting
