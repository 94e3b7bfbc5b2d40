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


@torch.no_grad()
def assert_norms_match(ours: nn.Module, ref: nn.Module) -> int:
    """Each normalisation layer of ours equals the reference's layer of the same name on inputs whose mean square
    is about its eps, where the output depends on eps; whole-model tests, at activations of size ~1, cannot see a
    wrong eps. A layer normalising dim 1 of [B, C, H, W] may be a last-dim norm in the reference, called on the
    permuted tensor. -> how many layers were compared."""
    ref_layers = dict(ref.named_modules())
    norms = [(name, m) for name, m in ours.named_modules() if "Norm" in type(m).__name__]
    gen = torch.Generator().manual_seed(0)
    for name, norm in norms:
        channels, ref_norm = norm.weight.shape[0], ref_layers[name]
        over_channels = isinstance(norm, (nn.GroupNorm, nn.BatchNorm2d)) or type(norm).__name__ == "ChannelRMSNorm"
        x = torch.randn((2, channels, 3, 3) if over_channels else (2, 5, channels), generator=gen) * norm.eps**0.5
        if over_channels and not isinstance(ref_norm, (nn.GroupNorm, nn.BatchNorm2d)):
            expected = ref_norm(x.movedim(1, -1)).movedim(-1, 1)  # [B, H, W, C] -> [B, C, H, W]
        else:
            expected = ref_norm(x)
        err = max_rel_err(norm(x), expected)
        assert err <= 1e-5, f"{name} ({type(norm).__name__}): max rel err {err:.3g} on inputs of size sqrt(eps)"
    assert norms, "no normalisation layer found"
    return len(norms)


def assert_channels_last_decode(vae, latents: torch.Tensor) -> None:
    """On CPU `vae.decode` runs channels-last (faster convolutions): the decoder's last convolution sees an NHWC
    tensor, and the image, returned contiguous, equals the default-layout (NCHW) decode."""
    layouts = []
    last_conv = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    hook = last_conv.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    decoded = vae.decode(latents)
    hook.remove()
    assert layouts == [True] and decoded.is_contiguous()
    post_quant_conv = getattr(vae, "post_quant_conv", None)
    assert_parity(decoded, vae.decoder(post_quant_conv(latents) if post_quant_conv else latents), tol=5e-6)


def assert_inputs_untouched(vae, latents: torch.Tensor, images: torch.Tensor) -> None:
    """In-place operations run on temporaries only: decode and encode leave their inputs as they were, and
    repeated calls give bit-identical outputs."""
    latents_copy, images_copy = latents.clone(), images.clone()
    first_decoded, first_latents = vae.decode(latents), vae.encode(images)
    assert torch.equal(latents, latents_copy) and torch.equal(images, images_copy)
    assert torch.equal(vae.decode(latents), first_decoded) and torch.equal(vae.encode(images), first_latents)
