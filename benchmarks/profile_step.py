"""Where one component's time goes: torch.profiler's operator table for ours or the reference.

    python benchmarks/profile_step.py --side ours --component step      # one 512 px CFG step
    python benchmarks/profile_step.py --side reference --component text --tokens 30
    python benchmarks/profile_step.py --device cuda --compile          # the GPU kernels of a compiled step

Only the profiled component is loaded, from the checkpoint that benchmarks/checkpoint.py builds and caches.
The component runs once to warm up (twice when compiled), then once under the profiler; on CUDA the table
lists the GPU kernels by their time. The dtype is bf16 where it is native, else fp32, as in compare.py.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from checkpoint import ensure_checkpoint  # noqa: E402
from common import (  # noqa: E402
    TOKENIZER_MAX_LENGTH, Timer, add_model_options, check_model_options, left_padded_mask, load_ours,
)  # fmt: skip

from mirage.loading import read_config  # noqa: E402
from mirage.precision import DTYPES  # noqa: E402


def ours(folder: Path, component: str, dtype, side: int, tokens: int, device, compile: bool = False):
    """-> a function running the component once on random inputs of the benchmark's shapes (`side`: the latent
    grid's side)."""
    from mirage.sampling import flow_match_sigmas
    from mirage.text_encoder import T5GemmaEncoder
    from mirage.transformer import MirageTransformer
    from mirage.vae_dcae import DCAE
    from mirage.vae_flux import FluxVAE

    config = read_config(folder)
    mask = left_padded_mask([1, tokens], tokens, device)  # the CFG batch: an empty negative prompt, then the prompt
    if component == "text":
        model = load_ours(folder, "text_encoder", T5GemmaEncoder, config.text_encoder, device, dtype, compile)
        ids = torch.randint(4, 500, (2, tokens), device=device)
        return lambda: model(ids, mask)
    if component == "step":
        model = load_ours(folder, "transformer", MirageTransformer, config.transformer, device, dtype, compile)
        latents = torch.randn(2, config.transformer.in_channels, side, side, dtype=model.dtype, device=device)
        embeds = torch.randn(2, tokens, config.transformer.context_in_dim, dtype=model.dtype, device=device)
        context = model.encode_text(embeds, mask)
        mod = model.modulate(flow_match_sigmas(28)[:1].to(device), side, side)
        return lambda: model.forward_modulated(latents, mod, context)
    vae_class = FluxVAE if config.vae_type == "flux" else DCAE
    model = load_ours(folder, "vae", vae_class, config.vae, device, dtype, compile)
    latents = torch.randn(1, model.latent_channels, side, side, dtype=next(model.parameters()).dtype, device=device)
    return lambda: model.decode(latents)


def reference(folder: Path, component: str, dtype, side: int, tokens: int, device):
    from diffusers import AutoencoderDC, AutoencoderKL, PRXTransformer2DModel
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    length = TOKENIZER_MAX_LENGTH  # the reference pads every prompt to it
    mask = left_padded_mask([1, tokens], length, device)  # the CFG batch: an empty negative prompt, then the prompt
    if component == "text":
        from transformers.models.t5gemma.configuration_t5gemma import T5GemmaConfig

        config = T5GemmaConfig.from_pretrained(folder / "text_encoder").encoder
        model = T5GemmaEncoder.from_pretrained(folder / "text_encoder", config=config, dtype=dtype).to(device).eval()
        ids = torch.randint(4, 500, (2, length), device=device)
        return lambda: model(input_ids=ids, attention_mask=mask)
    if component == "step":
        model = PRXTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype).to(device).eval()
        latents = torch.randn(2, model.config.in_channels, side, side, dtype=dtype, device=device)
        text = torch.randn(2, length, model.config.context_in_dim, dtype=dtype, device=device)
        t = torch.ones(2, device=device)
        return lambda: model(latents, t, text, mask, return_dict=False)[0]
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    vae_class = AutoencoderKL if vae_config["_class_name"] == "AutoencoderKL" else AutoencoderDC
    model = vae_class.from_pretrained(folder / "vae", torch_dtype=dtype).to(device).eval()
    latents = torch.randn(1, model.config.latent_channels, side, side, dtype=dtype, device=device)
    return lambda: model.decode(latents, return_dict=False)[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("ours", "reference"), default="ours", help="which implementation")
    parser.add_argument("--component", choices=("text", "step", "vae"), default="step", help="what to profile")
    add_model_options(parser)
    parser.add_argument("--tokens", type=int, default=34, help="real text tokens per prompt (default: 34)")
    parser.add_argument("--rows", type=int, default=25, help="operators to list (default: 25)")
    parser.add_argument("--compile", action="store_true", help="compile our component as compile=True does (ours only)")
    args = parser.parse_args(argv)
    check_model_options(parser, args)
    if args.compile and args.side != "ours":
        parser.error("--compile profiles our compiled models: use it with --side ours")
    if not 1 <= args.tokens <= TOKENIZER_MAX_LENGTH:
        parser.error(f"--tokens must be in [1, {TOKENIZER_MAX_LENGTH}]")
    device = torch.device(args.device)
    try:
        prx, mirage = ensure_checkpoint(args.cache, args.vae)
    except OSError as err:
        parser.error(f"--cache {args.cache} cannot be used ({err.strerror or err}): choose a writable folder")
    side = args.resolution // read_config(mirage).vae.spatial_compression
    with torch.no_grad():
        settings = (args.component, DTYPES[args.dtype], side, args.tokens, device)
        run = ours(mirage, *settings, args.compile) if args.side == "ours" else reference(prx, *settings)
        timer = Timer(device, repeats=1)
        for run_name in ("warm-up", "second warm-up")[: 2 if args.compile else 1]:  # a compiled first call compiles
            timer(run_name, run)
            print(f"{run_name} run: {timer.wall[run_name]:.2f} s")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            timer("profiled", run)
    print(f"profiled run: {timer.wall['profiled']:.3f} s")
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows))


if __name__ == "__main__":
    main()
