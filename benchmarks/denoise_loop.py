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
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from checkpoint import ensure_checkpoint  # noqa: E402
from common import (  # noqa: E402
    Timer, add_model_options, check_model_options, empty_compile_caches, left_padded_mask, load_ours,
)  # fmt: skip

from mirage.precision import DTYPES  # noqa: E402

MODES = ("eager", "graph", "compiled", "compiled-graph")
PROMPT_TOKENS, NEGATIVE_TOKENS = 34, 1


@torch.no_grad()
def worker(folder: Path, mode: str, args: argparse.Namespace, out: Path) -> None:
    """Time a cold loop of `mode`, then the best of `args.loops - 1` warm ones; save the times and latents to `out`."""
    from mirage.loading import read_config
    from mirage.sampling import denoise, flow_match_sigmas
    from mirage.transformer import MirageTransformer

    config = read_config(folder)
    device = torch.device(args.device)
    dtype, compiled = DTYPES[args.dtype], mode.startswith("compiled")
    model = load_ours(folder, "transformer", MirageTransformer, config.transformer, device, dtype, compiled)
    dtype = model.dtype
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, PROMPT_TOKENS, config.transformer.context_in_dim, generator=gen).to(device, dtype)
    mask = left_padded_mask([NEGATIVE_TOKENS, PROMPT_TOKENS], PROMPT_TOKENS, device)  # [2, L]
    side = args.resolution // config.vae.spatial_compression
    latents = torch.randn(1, config.transformer.in_channels, side, side, generator=gen).to(device, dtype)
    sigmas = flow_match_sigmas(args.steps, config.sampling.shift)

    def loop():
        context = model.encode_text(embeds, mask)
        return denoise(model, latents, sigmas, context, args.guidance, cuda_graph=mode.endswith("graph"))

    timer = Timer(device, args.loops - 1)
    timer("cold", loop, 1)
    result = timer("warm", loop)
    torch.save({"cold": timer.wall["cold"], "warm": timer.wall["warm"], "latents": result.float().cpu()}, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser, device="cuda")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps per loop (default: 28)")
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale, > 1 (default: 5)")
    parser.add_argument("--loops", type=int, default=3, help="loops per mode, the first cold (default: 3)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default: all")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_model_options(parser, args)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.loops < 2:
        parser.error("--loops must be at least 2: one cold loop, then warm ones")
    if args.guidance <= 1:
        parser.error("--guidance must be > 1: the loop measured is the CFG one (two text rows per image)")
    if torch.device(args.device).type != "cuda" and any(mode.endswith("graph") for mode in args.modes):
        parser.error("CUDA graph modes need --device cuda: choose --modes eager compiled")
    try:
        _, folder = ensure_checkpoint(args.cache, args.vae)
        (args.cache / "runs").mkdir(exist_ok=True)
    except OSError as err:
        parser.error(f"--cache {args.cache} cannot be used ({err.strerror or err}): choose a writable folder")
    if args.worker:
        worker(folder, args.worker[0], args, Path(args.worker[1]))
        return
    run_dir = Path(tempfile.mkdtemp(prefix="denoise-loop-", dir=args.cache / "runs"))
    results = {}
    for mode in args.modes:
        out = run_dir / f"{mode}.pt"
        command = [sys.executable, __file__, *(argv or sys.argv[1:]), "--worker", mode, str(out)]
        with empty_compile_caches() as env:
            if subprocess.run(command, env=env).returncode:
                sys.exit(f"denoise_loop.py: error: the {mode} worker failed (its error is above)")
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
