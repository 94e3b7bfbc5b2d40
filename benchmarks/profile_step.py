"""Where one component's time goes: torch.profiler's operator table for ours or the reference.

    python benchmarks/profile_step.py --side ours --component step      # one 512 px CFG step, bf16
    python benchmarks/profile_step.py --side reference --component text --tokens 30
    python benchmarks/profile_step.py --device cuda --compile          # the GPU kernels of a compiled step

Only the profiled component is loaded, from the checkpoint that benchmarks/checkpoint.py builds and caches.
The component runs once to warm up (twice when compiled), then once under the profiler; on CUDA the table
lists the GPU kernels by their time.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from checkpoint import DEFAULT_CACHE, VAE_TYPES, ensure_checkpoint  # noqa: E402
from compare import Timer  # noqa: E402

from mirage.precision import DTYPES  # noqa: E402


def ours(folder: Path, component: str, dtype, resolution: int, tokens: int, device, compile: bool = False):
    """-> a function running the component once on random inputs of the benchmark's shapes."""
    from mirage.loading import load_model, read_config
    from mirage.pipeline import compile_model
    from mirage.precision import run_dtype
    from mirage.sampling import flow_match_sigmas
    from mirage.text_encoder import T5GemmaEncoder
    from mirage.transformer import MirageTransformer
    from mirage.vae_dcae import DCAE
    from mirage.vae_flux import FluxVAE

    config = read_config(folder)

    def load(name, model_class, model_config):  # in the dtype the pipeline runs it in (see mirage.precision)
        path = folder / f"{name}.safetensors"
        model = load_model(lambda: model_class(model_config), path, device, run_dtype(model_class, dtype, device))
        return compile_model(model, name) if compile else model

    if component == "text":
        model = load("text_encoder", T5GemmaEncoder, config.text_encoder)
        ids = torch.randint(4, 500, (2, tokens), device=device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[0, :-1] = False  # the CFG batch: an empty negative prompt (one real token), then the prompt
        return lambda: model(ids, mask)
    if component == "step":
        model = load("transformer", MirageTransformer, config.transformer)
        dtype = model.dtype
        f = config.vae.spatial_compression
        latents = torch.randn(2, config.transformer.in_channels, resolution // f, resolution // f, dtype=dtype, device=device)
        embeds = torch.randn(2, tokens, config.transformer.context_in_dim, dtype=dtype, device=device)
        mask = torch.ones(2, tokens, dtype=torch.bool, device=device)
        mask[0, :-1] = False  # the CFG batch: an empty negative prompt (one real token), then the prompt
        context = model.encode_text(embeds, mask)
        mod = model.modulate(flow_match_sigmas(28)[:1].to(device), *latents.shape[-2:])
        return lambda: model.forward_modulated(latents, mod, context)
    vae_class = FluxVAE if config.vae_type == "flux" else DCAE
    model = load("vae", vae_class, config.vae)
    f = model.spatial_compression
    dtype = next(model.parameters()).dtype
    latents = torch.randn(1, model.latent_channels, resolution // f, resolution // f, dtype=dtype, device=device)
    return lambda: model.decode(latents)


def reference(folder: Path, component: str, dtype, resolution: int, tokens: int, device):
    from diffusers import AutoencoderDC, AutoencoderKL, PRXTransformer2DModel
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    if component == "text":
        from transformers.models.t5gemma.configuration_t5gemma import T5GemmaConfig

        config = T5GemmaConfig.from_pretrained(folder / "text_encoder").encoder
        model = T5GemmaEncoder.from_pretrained(folder / "text_encoder", config=config, dtype=dtype).to(device).eval()
        ids = torch.randint(4, 500, (2, 256), device=device)  # the reference pads every prompt to 256 tokens
        real = torch.tensor([[1], [tokens]], device=device)  # an empty negative prompt, then the prompt
        mask = torch.arange(256, device=device) >= 256 - real  # [2, 256], left padding
        return lambda: model(input_ids=ids, attention_mask=mask)
    if component == "step":
        model = PRXTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype).to(device).eval()
        f = 8 if model.config.in_channels == 16 else 32
        latents = torch.randn(2, model.config.in_channels, resolution // f, resolution // f, dtype=dtype, device=device)
        text = torch.randn(2, 256, model.config.context_in_dim, dtype=dtype, device=device)
        real = torch.tensor([[1], [tokens]], device=device)  # an empty negative prompt, then the prompt
        mask = torch.arange(256, device=device) >= 256 - real  # [2, 256]
        t = torch.ones(2, device=device)
        return lambda: model(latents, t, text, mask, return_dict=False)[0]
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    vae_class = AutoencoderKL if vae_config["_class_name"] == "AutoencoderKL" else AutoencoderDC
    model = vae_class.from_pretrained(folder / "vae", torch_dtype=dtype).to(device).eval()
    f = 8 if vae_class is AutoencoderKL else 32
    latents = torch.randn(1, model.config.latent_channels, resolution // f, resolution // f, dtype=dtype, device=device)
    return lambda: model.decode(latents, return_dict=False)[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("ours", "reference"), default="ours", help="which implementation")
    parser.add_argument("--component", choices=("text", "step", "vae"), default="step", help="what to profile")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="default: bf16")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--tokens", type=int, default=30, help="real text tokens per prompt (default: 30)")
    parser.add_argument("--vae", choices=VAE_TYPES, default="flux", help="checkpoint variant (default: flux)")
    parser.add_argument("--rows", type=int, default=25, help="operators to list (default: 25)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"checkpoint cache ({DEFAULT_CACHE})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--compile", action="store_true", help="compile our component as compile=True does (ours only)")
    args = parser.parse_args(argv)
    if args.compile and args.side != "ours":
        parser.error("--compile profiles our compiled models: use it with --side ours")
    device = torch.device(args.device)
    prx, mirage = ensure_checkpoint(args.cache, args.vae)
    with torch.no_grad():
        settings = (args.component, DTYPES[args.dtype], args.resolution, args.tokens, device)
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
