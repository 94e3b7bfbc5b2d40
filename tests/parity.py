"""Helpers shared by the parity tests: randomise every weight, compare against an oracle."""

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """Overwrite EVERY floating parameter and buffer with random values.

    The reference zero-initialises modulation layers and (1 + w) norm scales; left as they are they would
    hide bugs. Matrices get N(0, 1/fan_in) so activations keep their size through deep stacks;
    vectors (biases, norm scales) get N(0, 0.5^2), so signs and sizes vary across channels.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if not tensor.is_floating_point() or "inv_freq" in name:
            continue
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
        if tensor.ndim >= 2:
            noise = noise * scale / tensor[0].numel() ** 0.5
        else:
            noise = noise * 0.5 * scale
        tensor.copy_(noise.to(tensor.dtype))
    return module


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max(1, max |ref|): the error measure every parity bound is stated in."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def assert_parity(ours: torch.Tensor, ref: torch.Tensor, tol: float = 2e-5) -> None:
    assert torch.isfinite(ref).all(), "reference output is not finite"
    err = max_rel_err(ours, ref)
    assert err <= tol, f"max |ours - ref| / max(1, max|ref|) = {err:.3g} > {tol:.1g}"
