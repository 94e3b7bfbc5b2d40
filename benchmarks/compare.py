"""Mirage against diffusers' PRXPipeline on the full-size model: time, peak memory and output differences.

    python benchmarks/compare.py                                  # CPU, 512 px, Flux VAE, 28 steps
    python benchmarks/compare.py --dtype fp32 --parts text step vae   # the components only
    python benchmarks/compare.py --device cuda --resolution 1024 --vae dc-ae

The first run builds a full-size PRX checkpoint with random bf16 weights in diffusers layout and converts
it (benchmarks/checkpoint.py; ~15 GB under --cache, a few minutes, once). Every measurement then runs in a
subprocess of its own, one side at a time, so peak memories are not mixed and no process holds both
pipelines:
- text: cleaning, tokenising and encoding the prompt and the negative prompt (the reference pads both to
  256 tokens; ours to the longer of the two), only the text encoder loaded;
- step: one denoising step with CFG (batch 2) at the first noise level, only the transformer loaded, both
  sides given the same text embeddings; ours computes the text side of the transformer once per
  generation (`encode_text`), reported on its own line;
- vae: one decode of the same latents, only the VAE loaded;
- e2e: loading each pipeline from its folder and one generation of --steps steps through its public
  call, timed together (mirage reads each model on first use); its peak memory is what a user sees
  (CPU: peak RSS, CUDA: peak allocated, and reserved). On CUDA a second, warm generation is timed too
  ("generate"). The workers import their library before the clock starts, so importing it is timed on its
  own line, in a fresh process that has imported torch ("import"); a note says whether ours kept its text
  encoder after encoding or freed it (the default decides by the memory it finds free).
  --offload model|sequential offloads on both sides (diffusers' enable_*_cpu_offload, needs accelerate);
  --compile compiles ours as MiragePipeline(compile=True) does (transformer blocks, text-encoder layers, VAE
  decoder), --compile-reference the same parts of diffusers' models (it runs eager otherwise); --cuda-graph
  replays our denoising steps as a CUDA graph (e2e only: a graph is recorded at a generation's first step,
  which runs eagerly).
Components report the best of --repeats runs, and of --rounds worker processes per side (alternating
sides); a component is timed alone between synchronisations, so on a GPU its time includes launching it.
Every worker starts with empty compile caches (torch's and Triton's on-disk ones), so a cold compiled run
compiles; a worker finds its model's files in the page cache when an earlier run read them. The table gives
wall time (and, on CPU, the ratio of the processes' CPU times, steadier than wall time on a shared machine),
ours / reference, the speedup, and the largest difference between the two outputs. The last line projects a
whole generation from the components, without loading.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from checkpoint import HUGE_PAGES, ensure_checkpoint  # noqa: E402
from common import (  # noqa: E402
    TOKENIZER_MAX_LENGTH, Timer, add_model_options, check_model_options, empty_compile_caches, left_padded_mask,
    load_ours, peak_memory,
)  # fmt: skip

from mirage.pipeline import compile_model  # noqa: E402
from mirage.precision import DTYPES, dtype_name  # noqa: E402

PARTS = ("text", "step", "vae", "e2e")
SIDES = ("reference", "ours")
# Ordinary caption words, repeated until a prompt has the asked number of tokens.
WORDS = (
    "a photo of an old red tram on a sandy beach at sunset, warm light, film grain, seagulls over the water, "
    "a child with a kite, soft clouds, long shadows, highly detailed, sharp focus"
).split()


# ---- the reference (each function runs in a worker process of its own) -----------------------------------------


def as_asked(s: dict, model, name: str):
    """The reference's model `name`, compiled if --compile-reference asks, as `compile=True` compiles ours: the
    attributes it compiles (repeated blocks one by one, the VAE's decoder whole) have the same names in both."""
    return compile_model(model, name) if s.get("compile_reference") else model


def reference_text(s: dict, inputs: dict, timer: Timer) -> dict:
    from diffusers import PRXPipeline

    pipe = PRXPipeline.from_pretrained(s["prx"], transformer=None, vae=None, torch_dtype=s["dtype"]).to(s["device"])
    as_asked(s, pipe.text_encoder, "text_encoder")
    encode = lambda: pipe.encode_prompt(inputs["prompt"], s["device"], True, inputs["negative"])  # noqa: E731
    embeds, mask, negative_embeds, negative_mask = timer("text", encode)
    return {"text": torch.cat([negative_embeds, embeds]), "text_mask": torch.cat([negative_mask, mask])}


def reference_step(s: dict, inputs: dict, timer: Timer) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXTransformer2DModel

    folder = Path(s["prx"]) / "transformer"
    model = PRXTransformer2DModel.from_pretrained(folder, torch_dtype=s["dtype"])
    model = as_asked(s, model.to(s["device"]).eval(), "transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(Path(s["prx"]) / "scheduler")
    scheduler.set_timesteps(s["steps"], device=s["device"])
    t, g = scheduler.timesteps[0], s["guidance"]
    noise = inputs["noise"].to(s["device"], s["dtype"])
    embeds, mask = inputs["text"].to(s["device"], s["dtype"]), inputs["text_mask"].to(s["device"])

    def step():  # one iteration of PRXPipeline.__call__'s loop
        v = model(
            hidden_states=torch.cat([noise, noise]), timestep=(t.float() / 1000).view(1).repeat(2).to(s["device"]),
            encoder_hidden_states=embeds, attention_mask=mask, return_dict=False,
        )[0]  # fmt: skip
        uncond, cond = v.chunk(2)
        return uncond + g * (cond - uncond)

    return {"velocity": timer("step", step)}


def reference_vae(s: dict, inputs: dict, timer: Timer) -> dict:
    from diffusers import AutoencoderDC, AutoencoderKL

    vae_class = AutoencoderKL if s["vae"] == "flux" else AutoencoderDC
    vae = vae_class.from_pretrained(Path(s["prx"]) / "vae", torch_dtype=s["dtype"])
    vae = as_asked(s, vae.to(s["device"]).eval(), "vae")
    latents = inputs["noise"].to(s["device"], s["dtype"])
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # as PRXPipeline unscales them
    decode = lambda: vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]  # noqa: E731
    return {"decoded": timer("vae", decode)}


def reference_e2e(s: dict, inputs: dict, timer: Timer) -> dict:
    from diffusers import PRXPipeline

    def load():
        pipe = PRXPipeline.from_pretrained(s["prx"], torch_dtype=s["dtype"])
        if s.get("offload") == "model":
            pipe.enable_model_cpu_offload(device=s["device"])
        elif s.get("offload") == "sequential":
            pipe.enable_sequential_cpu_offload(device=s["device"])
        else:
            pipe.to(s["device"])
        for name in ("transformer", "text_encoder", "vae"):
            as_asked(s, getattr(pipe, name), name)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(pipe):
        return pipe(
            inputs["prompt"], negative_prompt=inputs["negative"], height=s["resolution"], width=s["resolution"],
            num_inference_steps=s["steps"], guidance_scale=s["guidance"],
            latents=inputs["noise"].to(s["device"], s["dtype"]), output_type="pt", use_resolution_binning=False,
        ).images  # fmt: skip

    return time_e2e(s, timer, load, generate)


IMPORTS = {"reference": "from diffusers import PRXPipeline", "ours": "from mirage.pipeline import MiragePipeline"}


def time_import(side: str, timer: Timer) -> None:
    """Import the side's pipeline in a fresh process that has imported torch: what a first image in a new process
    pays on top of "load + generate", whose workers import before timing."""
    code = (
        "import sys, time, torch; sys.path.insert(0, sys.argv[1]); wall, cpu = time.perf_counter(), time.process_time()"
        f"; {IMPORTS[side]}; print(time.perf_counter() - wall, time.process_time() - cpu)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], check=True, stdout=subprocess.PIPE, text=True)
    timer.wall["import"], timer.cpu["import"] = map(float, done.stdout.splitlines()[-1].split())  # errors: stderr


def time_e2e(s: dict, timer: Timer, load, generate) -> dict:
    """Loading and a first generation, timed together; on CUDA also a second generation ("generate"), where
    loading is most of the first one."""
    pipe = None

    def load_and_generate():
        nonlocal pipe
        pipe = load()
        return generate(pipe)

    images = timer("e2e", load_and_generate, 1)
    if s["device"].type == "cuda":
        images = timer("generate", lambda: generate(pipe))
    return {"images": images}


# ---- ours ------------------------------------------------------------------------------------------------------


def build(s: dict, name: str, model_class, config):
    """One of our models as MiragePipeline loads it (see `load_ours`), its dtype recorded for the report."""
    model = load_ours(s["mirage"], name, model_class, config, s["device"], s["dtype"], s.get("compile", False))
    s["ran_in"][name] = dtype_name(next(model.parameters()).dtype)
    return model


def ours_text(s: dict, inputs: dict, timer: Timer) -> dict:
    from mirage.loading import read_config
    from mirage.prompt_cleaning import clean_prompt
    from mirage.text_encoder import T5GemmaEncoder
    from mirage.tokenizer import GemmaTokenizer

    config = read_config(s["mirage"])
    encoder = build(s, "text_encoder", T5GemmaEncoder, config.text_encoder)
    tokenizer = GemmaTokenizer(Path(s["mirage"]) / "tokenizer.model", config.tokenizer)

    def encode():  # as MiragePipeline.encode_prompts: negatives first, padded to the longest prompt only
        ids, mask = tokenizer([clean_prompt(inputs["negative"]), clean_prompt(inputs["prompt"])], padding="longest")
        ids, mask = ids.to(s["device"]), mask.to(s["device"])
        return encoder(ids, mask), mask

    embeds, mask = timer("text", encode)
    return {"text": embeds, "text_mask": mask}


def ours_step(s: dict, inputs: dict, timer: Timer) -> dict:
    from mirage.loading import read_config
    from mirage.sampling import denoise, flow_match_sigmas
    from mirage.transformer import MirageTransformer

    config = read_config(s["mirage"])
    model = build(s, "transformer", MirageTransformer, config.transformer)
    dtype = model.dtype
    noise = inputs["noise"].to(s["device"], dtype)
    embeds, mask = inputs["text"].to(s["device"], dtype), inputs["text_mask"].to(s["device"])
    context = timer("text side", lambda: model.encode_text(embeds, mask))
    sigmas = flow_match_sigmas(s["steps"], config.sampling.shift)[:2]  # the schedule's first step

    def step():
        seen = {}
        denoise(model, noise, sigmas, context, s["guidance"], callback=lambda i, sigma, x, v: seen.update(v=v))
        return seen["v"]

    return {"velocity": timer("step", step)}


def ours_vae(s: dict, inputs: dict, timer: Timer) -> dict:
    from mirage.autoencoder import decode_latents
    from mirage.loading import read_config
    from mirage.vae_dcae import DCAE
    from mirage.vae_flux import FluxVAE

    config = read_config(s["mirage"])
    vae_class = FluxVAE if s["vae"] == "flux" else DCAE
    vae = build(s, "vae", vae_class, config.vae)
    latents = inputs["noise"].to(s["device"], s["dtype"])
    return {"decoded": timer("vae", lambda: decode_latents(vae, latents, tiled=False))}


def ours_e2e(s: dict, inputs: dict, timer: Timer) -> dict:
    from mirage.pipeline import MiragePipeline

    def load():  # MiragePipeline reads each model on first use, so most loading happens in the first call
        return MiragePipeline.from_pretrained(
            s["mirage"], device=s["device"], dtype=s["dtype"], offload=s.get("offload"), compile=s.get("compile", False),
            cuda_graph=s.get("cuda_graph", False),
        )  # fmt: skip

    def generate(pipe):
        images = pipe(
            inputs["prompt"], negative_prompt=inputs["negative"], height=s["resolution"], width=s["resolution"],
            num_inference_steps=s["steps"], guidance_scale=s["guidance"],
            latents=inputs["noise"].to(s["device"], s["dtype"]), output_type="pt", use_resolution_binning=False,
            progress=False,
        )  # fmt: skip
        s["text_encoder_kept"] = "text_encoder" in pipe.models
        return images

    return time_e2e(s, timer, load, generate)


WORKERS = {
    ("reference", "text"): reference_text, ("reference", "step"): reference_step,
    ("reference", "vae"): reference_vae, ("reference", "e2e"): reference_e2e,
    ("ours", "text"): ours_text, ("ours", "step"): ours_step, ("ours", "vae"): ours_vae, ("ours", "e2e"): ours_e2e,
}  # fmt: skip


def quiet_oracles() -> None:
    """No progress bars, deprecation notes or advice from diffusers and transformers in the benchmark's output."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore")
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def worker(run_dir: Path, side: str, part: str) -> None:
    if side == "reference":  # never on our side: importing the oracles would add ~200 MB to our RSS
        quiet_oracles()
    settings = json.loads((run_dir / "settings.json").read_text())
    device = torch.device(settings["device"])
    s = {**settings, "device": device, "dtype": DTYPES[settings["dtype"]], "ran_in": {}}  # ran_in: see `build`
    inputs = torch.load(run_dir / "inputs.pt")
    timer = Timer(device, settings["repeats"])
    if part == "e2e":
        time_import(side, timer)
    with torch.no_grad():
        outputs = WORKERS[side, part](s, inputs, timer)
    result = {"wall": timer.wall, "cpu": timer.cpu, "peak_memory": peak_memory(device), "dtypes": s["ran_in"]}
    if "text_encoder_kept" in s:
        result["text_encoder_kept"] = s["text_encoder_kept"]
    if device.type == "cuda":  # what the caching allocator held at most: the memory other processes could not have
        result["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    torch.save({k: v.float().cpu() for k, v in outputs.items()}, run_dir / f"{side}-{part}.pt")
    (run_dir / f"{side}-{part}.json").write_text(json.dumps(result))


# ---- the parent: inputs, workers, report -----------------------------------------------------------------------


def make_prompt(tokenizer, tokens: int) -> tuple[str, int]:
    """A caption of ordinary words with about `tokens` tokens (<bos> included); -> (text, its token count)."""
    from mirage.prompt_cleaning import clean_prompt

    words, count = [], 1
    while count < tokens:
        words.append(WORDS[len(words) % len(WORDS)])
        count = len(tokenizer([clean_prompt(" ".join(words))], padding="longest")[0][0])
    return " ".join(words), count


def make_inputs(settings: dict, prompt_tokens: int, negative_tokens: int) -> dict:
    """The prompts, the initial noise, and (for the step) text embeddings padded as the reference pads them."""
    from mirage.loading import read_config
    from mirage.tokenizer import GemmaTokenizer

    folder = Path(settings["mirage"])
    config = read_config(folder)
    tokenizer = GemmaTokenizer(folder / "tokenizer.model", config.tokenizer)
    prompt, n_prompt = make_prompt(tokenizer, prompt_tokens)
    negative, n_negative = make_prompt(tokenizer, negative_tokens) if negative_tokens > 1 else ("", 1)
    g = torch.Generator().manual_seed(0)
    latent = settings["resolution"] // config.vae.spatial_compression
    noise = torch.randn(1, config.transformer.in_channels, latent, latent, generator=g)
    text = torch.randn(2, TOKENIZER_MAX_LENGTH, config.transformer.context_in_dim, generator=g)
    text_mask = left_padded_mask([n_negative, n_prompt], TOKENIZER_MAX_LENGTH)  # [2, 256]
    dtype = DTYPES[settings["dtype"]]
    return dict(prompt=prompt, negative=negative, prompt_tokens=n_prompt, negative_tokens=n_negative,
                noise=noise.to(dtype), text=text.to(dtype), text_mask=text_mask)  # fmt: skip


def run_worker(run_dir: Path, side: str, part: str, timeout: int, best: dict | None) -> dict:
    """Run one worker process; -> its result, merged with `best` (an earlier round's): the fastest times, the
    highest peak memory."""
    cmd = [sys.executable, __file__, "--worker", side, part, "--run-dir", str(run_dir)]
    print(f"  {part}: {side} ...", flush=True)
    try:
        with empty_compile_caches() as env:
            subprocess.run(cmd, check=True, timeout=timeout, env=env)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"the {side} {part} worker failed (exit {err.returncode}; its error is above)") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the {side} {part} worker ran over --timeout {timeout} s") from None
    result = json.loads((run_dir / f"{side}-{part}.json").read_text())
    result["outputs"] = torch.load(run_dir / f"{side}-{part}.pt")
    if best is not None:
        for clock in ("wall", "cpu"):
            result[clock] = {k: min(v, best[clock][k]) for k, v in result[clock].items()}
        for peak in ("peak_memory", "peak_reserved"):
            if peak in result:
                result[peak] = max(result[peak], best[peak])
    return result


def max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max(1, max |ref|), the error measure of the parity tests."""
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def difference(part: str, ours: dict, ref: dict) -> str:
    if part == "text":
        o, mask = ours["text"], ours["text_mask"].bool()
        length = o.shape[1]  # both pad on the left: ours are the reference's last `length` columns
        r, r_mask = ref["text"][:, -length:], ref["text_mask"][:, -length:].bool()
        if not torch.equal(mask, r_mask) or ref["text_mask"].sum() != mask.sum():
            return "the two sides tokenised differently"
        return f"{max_rel(o[mask], r[mask]):.2g} rel"
    if part == "e2e":
        d = (ours["images"] - ref["images"]).abs()
        return f"{d.max().item():.2g} max, {d.mean().item():.2g} mean |px| in [0, 1]"
    key = {"step": "velocity", "vae": "decoded"}[part]
    return f"{max_rel(ours[key], ref[key]):.2g} rel"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM"
    if torch.cuda.is_available():
        return text + f", {torch.cuda.get_device_name()}"
    if hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported"):
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        text += ", native bf16" if native else ", no native bf16 (bf16 is emulated)"
    # Both sides' workers inherit it: 2 MB pages change how often each side page-faults (see the README's CPU part).
    return text + f", {HUGE_PAGES}={os.environ.get(HUGE_PAGES, 'unset')}"


def accelerate_note() -> str:
    """Whether diffusers had accelerate, without which it builds its models with random weights before loading."""
    try:
        return f"(accelerate {importlib.metadata.version('accelerate')})"
    except importlib.metadata.PackageNotFoundError:
        return "(no accelerate)"


LABELS = {
    "text": "text encoding (prompt + negative)",
    "text side": "  transformer text side (once per call)",
    "step": "one denoising step (CFG, {resolution} px)",
    "vae": "VAE decode",
    "e2e": "load + generate ({steps} steps)",
    "generate": "  generate, warm ({steps} steps)",
    "import": "  import (after torch; not in the above)",
}
EXTRA_ROWS = {"step": ("text side",), "e2e": ("generate", "import")}  # timed in the part's worker, shown under it


def report(settings: dict, inputs: dict, results: dict, load: tuple[float, float]) -> str:
    """The table: a header, each part's rows (times, ratios, difference, peak memory), then notes."""
    lines = header(settings, inputs, load)
    for part in (p for p in PARTS if p in results["ours"]):
        lines += part_rows(part, settings, inputs, results["reference"][part], results["ours"][part])
    notes = dtype_note(settings, results) + text_encoder_note(results)
    return "\n".join(lines + notes + projection(settings, results))


def header(settings: dict, inputs: dict, load: tuple[float, float]) -> list[str]:
    import diffusers

    options = {
        "ours compiled": settings.get("compile"),
        "diffusers compiled": settings.get("compile_reference"),
        "ours with CUDA graphs (e2e)": settings.get("cuda_graph"),
        f"offload {settings.get('offload')} (e2e, both sides)": settings.get("offload"),
    }
    return [
        f"Mirage vs diffusers PRXPipeline, {datetime.now():%Y-%m-%d %H:%M}",
        f"{machine()}; torch {torch.__version__}, diffusers {diffusers.__version__} {accelerate_note()}; "
        f"load average {load[0]:.1f} before, {load[1]:.1f} after",
        f"{settings['device']} {settings['dtype']}, {settings['resolution']} px, {settings['vae']} VAE, "
        f"CFG {settings['guidance']}, prompt {inputs['prompt_tokens']} tokens, negative {inputs['negative_tokens']}; "
        f"components: best of {settings['repeats']} runs x {settings['rounds']} rounds"
        + "".join(f"; {option}" for option, on in options.items() if on),
        "",
        f"{'':40}{'reference':>11}{'mirage':>10}{'ours/ref':>9}{'speedup':>9}"
        f"{'CPU time' if on_cpu(settings) else '':>10}  max difference",
    ]


def on_cpu(settings: dict) -> bool:
    return torch.device(settings["device"]).type == "cpu"


def part_rows(part: str, settings: dict, inputs: dict, ref: dict, ours: dict) -> list[str]:
    """Time rows (ours/ref and the speedup; on CPU also the ratio of CPU times), then TFLOP/s and peak memory."""
    lines, cpu = [], on_cpu(settings)
    for key in (k for k in (part, *EXTRA_ROWS.get(part, ())) if k in ours["wall"]):
        label, o = LABELS[key].format(**settings), ours["wall"][key]
        if key not in ref["wall"]:  # done once per call by ours only
            lines.append(f"{label:40}{'-':>11}{seconds(o):>10}")
            continue
        r = ref["wall"][key]
        cpu_ratio = f"{ours['cpu'][key] / ref['cpu'][key]:10.2f}" if cpu else ""
        diff = difference(part, ours["outputs"], ref["outputs"]) if key == part else ""
        lines.append(f"{label:40}{seconds(r):>11}{seconds(o):>10}{o / r:9.2f}{r / o:8.2f}x{cpu_ratio}  {diff}")
    if part == "step":
        flops = step_flops(settings, inputs)
        label = f"  model TFLOP/s ({flops / 1e12:.2f} TFLOP a step)"
        lines.append(f"{label:40}{flops / ref['wall']['step'] / 1e12:11.3g}{flops / ours['wall']['step'] / 1e12:10.3g}")
    memory_name = "peak RSS" if cpu else "peak GPU memory"
    for peak, name in (("peak_memory", memory_name), ("peak_reserved", "peak GPU memory reserved")):
        if peak in ours:
            r_mem, o_mem = ref[peak] / 1e9, ours[peak] / 1e9
            label = f"  {name}, {part} process"
            lines.append(f"{label:40}{r_mem:9.2f}GB{o_mem:8.2f}GB{o_mem / r_mem:9.2f}")
    return lines


def dtype_note(settings: dict, results: dict) -> list[str]:
    """A line naming our models that ran in another dtype than the one asked (mirage.precision), if any."""
    requested = dtype_name(DTYPES[settings["dtype"]])
    ran = {name: dtype for result in results["ours"].values() for name, dtype in result["dtypes"].items()}
    changed = ", ".join(f"{name} in {dtype}" for name, dtype in ran.items() if dtype != requested)
    if not changed:
        return []
    return [f"note: ours ran {changed} (mirage.precision); the reference ran everything in {settings['dtype']}"]


def text_encoder_note(results: dict) -> list[str]:
    """Whether our e2e generation kept its text encoder loaded, which its peak memory depends on."""
    kept = results["ours"].get("e2e", {}).get("text_encoder_kept")
    if kept is None:
        return []
    if kept:
        return ["note: ours kept its text encoder loaded after encoding (memory ample: over twice all weights free)"]
    return ["note: ours freed its text encoder once the prompts were encoded (memory not ample; sample.py --prompt "
            "always frees it)"]  # fmt: skip


def projection(settings: dict, results: dict) -> list[str]:
    """A whole generation projected from the components (without loading), when all three were measured."""
    if not {"step", "text", "vae"} <= set(results["ours"]):
        return []
    projected = {}
    for side in SIDES:
        wall = {k: v for part in ("text", "step", "vae") for k, v in results[side][part]["wall"].items()}
        projected[side] = wall["text"] + wall.get("text side", 0) + settings["steps"] * wall["step"] + wall["vae"]
    r, o = projected["reference"], projected["ours"]
    label = f"projected: text + {settings['steps']} steps + decode"
    return [f"{label:40}{seconds(r):>11}{seconds(o):>10}{o / r:9.2f}{r / o:8.2f}x"]


def seconds(t: float) -> str:
    return f"{t:.2f} s" if t >= 1 else f"{t * 1000:.1f} ms"


def step_flops(settings: dict, inputs: dict) -> float:
    """The model FLOPs of one CFG step: the linear layers on both rows' image tokens and the attention of each
    row's image queries over its image keys and its own prompt's tokens (not padding); what a step must compute,
    whichever way it is computed."""
    from mirage.loading import read_config

    mirage = read_config(settings["mirage"])
    config = mirage.transformer
    tokens = (settings["resolution"] // (mirage.vae.spatial_compression * config.patch_size)) ** 2
    d, d_mlp = config.hidden_size, config.mlp_hidden_size
    linear_macs = 4 * d * d + 3 * d * d_mlp  # a token's qkv + out, gate + up + down
    keys = (tokens + inputs["prompt_tokens"], tokens + inputs["negative_tokens"])  # the cond and uncond rows
    macs = sum(tokens * (linear_macs + 2 * row_keys * d) for row_keys in keys)  # + QK^T and PV
    return 2 * config.depth * macs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--steps", type=int, default=28, help="denoising steps end to end (default: 28)")
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale, > 1 (default: 5)")
    parser.add_argument("--prompt-tokens", type=int, default=34,
                        help="prompt length: at least this many tokens with <bos>, in whole words (default: 34)")
    parser.add_argument("--negative-tokens", type=int, default=1, help="negative prompt length; 1 = empty, the default")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per component, the fastest reported (default: 2)")
    parser.add_argument("--rounds", type=int, default=1, help="worker processes per side and part (default: 1)")
    parser.add_argument("--compile", action="store_true", help="ours: compile as MiragePipeline(compile=True)")
    parser.add_argument("--compile-reference", action="store_true", help="diffusers: compile what --compile does")
    parser.add_argument("--cuda-graph", action="store_true", help="ours, e2e: replay the steps as a CUDA graph")
    parser.add_argument("--offload", choices=("model", "sequential"), help="e2e: both sides offload models (CUDA)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per worker process (default: 1800)")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "PART"), help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None:
        check_model_options(parser, args)
        check_run_options(parser, args)
    return args


def check_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What compare.py alone takes: steps, guidance, prompt lengths, repeats, and what combines with what."""
    if min(args.steps, args.repeats, args.rounds, args.timeout) < 1 or not 1 < args.guidance < math.inf:
        parser.error("need a finite --guidance > 1 and --steps, --repeats, --rounds, --timeout >= 1")
    if not 2 <= args.prompt_tokens <= TOKENIZER_MAX_LENGTH or not 1 <= args.negative_tokens <= TOKENIZER_MAX_LENGTH:
        limit = TOKENIZER_MAX_LENGTH
        parser.error(f"--prompt-tokens must be in [2, {limit}] and --negative-tokens in [1, {limit}]")
    if (args.compile or args.compile_reference) and args.offload == "sequential":
        parser.error("compiling does not combine with --offload sequential (each streamed part breaks the graph)")
    cuda = torch.device(args.device).type == "cuda"
    if args.cuda_graph and (not cuda or args.offload == "sequential"):
        parser.error("--cuda-graph needs --device cuda and no --offload sequential")
    if args.offload and not cuda:
        parser.error("--offload needs --device cuda: it moves models between the CPU and the GPU")
    if args.offload and importlib.util.find_spec("accelerate") is None:
        parser.error("--offload: diffusers offloads with accelerate, which is not installed (pip install accelerate)")
    if (args.compile or args.compile_reference) and args.repeats < 2 and set(args.parts) - {"e2e"}:
        parser.error("--compile needs --repeats >= 2 for text, step and vae: a compiled model's first run compiles")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.run_dir, *args.worker)
        return
    try:
        prx, mirage = ensure_checkpoint(args.cache, args.vae)
        (args.cache / "runs").mkdir(exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=f"{datetime.now():%Y%m%d-%H%M%S}-", dir=args.cache / "runs"))
    except OSError as err:
        raise OSError(f"--cache {args.cache} cannot be used ({err.strerror or err}): choose a writable folder") from None
    settings = dict(
        prx=str(prx), mirage=str(mirage), device=args.device, dtype=args.dtype, resolution=args.resolution,
        steps=args.steps, guidance=args.guidance, vae=args.vae, repeats=args.repeats, rounds=args.rounds,
        compile=args.compile, compile_reference=args.compile_reference, cuda_graph=args.cuda_graph,
        offload=args.offload,
    )  # fmt: skip
    (run_dir / "settings.json").write_text(json.dumps(settings, indent=2))
    inputs = make_inputs(settings, args.prompt_tokens, args.negative_tokens)
    torch.save(inputs, run_dir / "inputs.pt")
    print(f"running in {run_dir}", flush=True)
    load_before = os.getloadavg()[0]
    results = {side: {} for side in SIDES}
    for part in (p for p in PARTS if p in args.parts):
        for _ in range(args.rounds):  # alternating sides, so a busy spell of the machine does not hit one side only
            for side in SIDES:
                results[side][part] = run_worker(run_dir, side, part, args.timeout, results[side].get(part))
    table = report(settings, inputs, results, (load_before, os.getloadavg()[0]))
    (run_dir / "report.txt").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, OSError) as err:  # a worker's failure, or a cache folder that cannot be written
        sys.exit(f"compare.py: error: {err}")
