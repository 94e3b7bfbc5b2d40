"""Where one component's time goes: torch.profiler's operator table for ours or the reference.

    python benchmarks/profile_step.py --side ours --component step      # one 512 px CFG step, bf16
    python benchmarks/profile_step.py --side reference --component text --tokens 30

Only the profiled component is loaded, from the checkpoint that benchmarks/compare.py builds and caches.
The component runs once to warm up, then once under the profiler.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from checkpoint import DEFAULT_CACHE, VAE_TYPES, ensure_checkpoint  # noqa: E402

from mirage.precision import DTYPES  # noqa: E402


def ours(folder: Path, component: str, dtype, resolution: int, tokens: int):
    """-> a function running the component once on random inputs of the benchmark's shapes."""
    from mirage.loading import load_model, read_config
    from mirage.sampling import flow_match_sigmas
    from mirage.text_encoder import T5GemmaEncoder
    from mirage.transformer import MirageTransformer
    from mirage.vae_dcae import DCAE
    from mirage.vae_flux import FluxVAE

    config = read_config(folder)

    def load(name, make):
        return load_model(make, folder / f"{name}.safetensors", dtype=dtype)

    if component == "text":
        model = load("text_encoder", lambda: T5GemmaEncoder(config.text_encoder))
        ids = torch.randint(4, 500, (2, tokens))
        return lambda: model(ids, torch.ones_like(ids, dtype=torch.bool))
    if component == "step":
        model = load("transformer", lambda: MirageTransformer(config.transformer))
        f = 8 if config.vae_type == "flux" else 32
        latents = torch.randn(2, config.transformer.in_channels, resolution // f, resolution // f, dtype=dtype)
        context = model.encode_text(torch.randn(2, tokens, config.transformer.context_in_dim, dtype=dtype))
        mod = model.modulate(flow_match_sigmas(28)[:1], *latents.shape[-2:])
        return lambda: model.forward_modulated(latents, mod, context)
    vae_class = FluxVAE if config.vae_type == "flux" else DCAE
    model = load("vae", lambda: vae_class(config.vae))
    f = model.spatial_compression
    latents = torch.randn(1, model.latent_channels, resolution // f, resolution // f, dtype=dtype)
    return lambda: model.decode(latents)


def reference(folder: Path, component: str, dtype, resolution: int, tokens: int):
    from diffusers import AutoencoderDC, AutoencoderKL, PRXTransformer2DModel
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    if component == "text":
        from transformers.models.t5gemma.configuration_t5gemma import T5GemmaConfig

        config = T5GemmaConfig.from_pretrained(folder / "text_encoder").encoder
        model = T5GemmaEncoder.from_pretrained(folder / "text_encoder", config=config, dtype=dtype).eval()
        ids = torch.randint(4, 500, (2, 256))  # the reference pads every prompt to 256 tokens
        mask = torch.arange(256) >= 256 - tokens
        return lambda: model(input_ids=ids, attention_mask=mask.expand(2, -1))
    if component == "step":
        model = PRXTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype).eval()
        f = 8 if model.config.in_channels == 16 else 32
        latents = torch.randn(2, model.config.in_channels, resolution // f, resolution // f, dtype=dtype)
        text = torch.randn(2, 256, model.config.context_in_dim, dtype=dtype)
        mask = (torch.arange(256) >= 256 - tokens).expand(2, -1)
        t = torch.ones(2)
        return lambda: model(latents, t, text, mask, return_dict=False)[0]
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    vae_class = AutoencoderKL if vae_config["_class_name"] == "AutoencoderKL" else AutoencoderDC
    model = vae_class.from_pretrained(folder / "vae", torch_dtype=dtype).eval()
    f = 8 if vae_class is AutoencoderKL else 32
    latents = torch.randn(1, model.config.latent_channels, resolution // f, resolution // f, dtype=dtype)
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
    args = parser.parse_args(argv)
    prx, mirage = ensure_checkpoint(args.cache, args.vae)
    make = ours if args.side == "ours" else reference
    with torch.no_grad():
        folder = mirage if args.side == "ours" else prx
        run = make(folder, args.component, DTYPES[args.dtype], args.resolution, args.tokens)
        start = time.perf_counter()
        run()
        print(f"warm-up run: {time.perf_counter() - start:.2f} s")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
    print(f"profiled run: {elapsed:.2f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
