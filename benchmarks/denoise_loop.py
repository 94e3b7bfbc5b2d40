"""Our denoising loop alone, cold and warm, for each way of running it: eager, CUDA graph, compiled, both.

    python benchmarks/denoise_loop.py --device cuda                    # 512 px, 28 CFG steps, bf16, every mode
    python benchmarks/denoise_loop.py --device cpu --dtype fp32 --modes eager compiled --steps 4

The transformer comes from the checkpoint that benchmarks/checkpoint.py builds and caches; the text side is
random embeddings shaped like a 34-token prompt and an empty negative prompt (one token, padded). Each mode
runs in a process of its own, with empty compile caches, so its first loop is a cold one (cuDNN plans, graph
recording, compiling); the table gives that loop, the best of the warm ones after it, and how far each mode's
latents are from eager mode's (CUDA graphs replay eager's kernels; compiling fuses them, which rounds
differently).
"""

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from checkpoint import DEFAULT_CACHE, VAE_TYPES, ensure_checkpoint  # noqa: E402
from compare import Timer, empty_compile_caches  # noqa: E402

from mirage.precision import DTYPES  # noqa: E402

MODES = ("eager", "graph", "compiled", "compiled-graph")
PROMPT_TOKENS, NEGATIVE_TOKENS = 34, 1


@torch.no_grad()
def worker(folder: Path, mode: str, args: argparse.Namespace, out: Path) -> None:
    """Time a cold loop of `mode`, then the best of `args.loops - 1` warm ones; save the times and latents to `out`."""
    from mirage.loading import load_model, read_config
    from mirage.sampling import denoise, flow_match_sigmas
    from mirage.pipeline import compile_model
    from mirage.precision import run_dtype
    from mirage.transformer import MirageTransformer

    config = read_config(folder)
    device = torch.device(args.device)
    dtype = run_dtype(MirageTransformer, DTYPES[args.dtype], device)  # as the pipeline runs it
    model = load_model(lambda: MirageTransformer(config.transformer), folder / "transformer.safetensors", device, dtype)
    if mode.startswith("compiled"):
        compile_model(model, "transformer")
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, PROMPT_TOKENS, config.transformer.context_in_dim, generator=gen).to(device, dtype)
    mask = torch.ones(2, PROMPT_TOKENS, dtype=torch.bool, device=device)
    mask[0, : PROMPT_TOKENS - NEGATIVE_TOKENS] = False  # the negative prompt's row (first, as batched), left-padded
    side = args.resolution // config.vae.spatial_compression
    latents = torch.randn(1, config.transformer.in_channels, side, side, generator=gen).to(device, dtype)
    sigmas = flow_match_sigmas(args.steps)

    def loop():
        context = model.encode_text(embeds, mask)
        return denoise(model, latents, sigmas, context, args.guidance, cuda_graph=mode.endswith("graph"))

    timer = Timer(device, args.loops - 1)
    timer("cold", loop, 1)
    result = timer("warm", loop)
    torch.save({"cold": timer.wall["cold"], "warm": timer.wall["warm"], "latents": result.float().cpu()}, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu (default: cuda)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="default: bf16")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps per loop (default: 28)")
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale, > 1 (default: 5)")
    parser.add_argument("--loops", type=int, default=3, help="loops per mode, the first cold (default: 3)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default: all")
    parser.add_argument("--vae", choices=VAE_TYPES, default="flux", help="checkpoint variant (default: flux)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"checkpoint cache ({DEFAULT_CACHE})")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loops < 2:
        parser.error("--loops must be at least 2: one cold loop, then warm ones")
    if args.guidance <= 1:
        parser.error("--guidance must be > 1: the loop measured is the CFG one (two text rows per image)")
    if torch.device(args.device).type != "cuda" and any(mode.endswith("graph") for mode in args.modes):
        parser.error("CUDA graph modes need --device cuda: choose --modes eager compiled")
    _, folder = ensure_checkpoint(args.cache, args.vae)
    if args.worker:
        worker(folder, args.worker[0], args, Path(args.worker[1]))
        return
    results = {}
    for mode in args.modes:
        out = folder.parent / "runs" / f"denoise-loop-{mode}.pt"
        out.parent.mkdir(exist_ok=True)
        command = [sys.executable, __file__, *(argv or sys.argv[1:]), "--worker", mode, str(out)]
        with empty_compile_caches() as env:
            subprocess.run(command, check=True, env=env)
        results[mode] = torch.load(out)
    report(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    print(f"\n{args.device} {args.dtype}, {args.resolution} px, {args.vae}, {args.steps} steps, CFG {args.guidance}")
    print(f"{'mode':16}{'cold loop':>12}{'warm loop':>12}   max |latents - eager|")
    eager = results.get("eager")
    for mode, result in results.items():
        difference = f"{(result['latents'] - eager['latents']).abs().max():.2e}" if eager else "-"
        print(f"{mode:16}{result['cold']:10.3f} s{result['warm']:10.3f} s   {difference}")


if __name__ == "__main__":
    main()
