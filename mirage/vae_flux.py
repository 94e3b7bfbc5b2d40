"""The Flux VAE: the KL autoencoder published with FLUX.1, encoder and decoder.

Follows diffusers `AutoencoderKL` (itself the latent-diffusion autoencoder): a convolutional encoder
that halves the resolution at every level but the last, a mid block with one single-head spatial
self-attention between two resnets, and a mirror-image decoder whose levels each have one resnet more
and upsample with nearest-neighbour 2x + conv. Module and parameter names are diffusers', so its
state dict loads as it is.

Deviations: `encode` returns the mean of the latent distribution (its mode) instead of a distribution
object, as PRX never samples it; diffusers' slicing, tiling and attention-processor machinery are left
out (tiling for every VAE lives in `mirage.autoencoder`); on CPU, `decode` runs in the channels-last
memory layout, on which oneDNN's convolutions are faster (GroupNorm rounds slightly worse there: see `decode`).

Precision: float16 is not safe with the published weights: users report black (NaN) FLUX.1 images
when this VAE runs in fp16 (InvokeAI issue 7208; its config also sets force_upcast), so it is marked
`fp16_safe = False` and the pipeline never runs it in fp16. Random full-size weights cannot show
this: on realistic latents (unit-variance scaled latents, spatially correlated) their largest decoder
activation is ~23 at 512 and 1024 px, far below fp16's 65504, and a decode with every module output
rounded to fp16 stays finite within 0.002 of fp32.

Shapes: B batch, C channels (C_in/C_out: a layer's input/output width, the image's at the model's two ends;
C_0 ... C_last: block_out_channels; C_latent: latent channels), H/W image height/width (inside a block or
layer: its input's), h/w latent grid (H/f, W/f, f the spatial compression), L = h*w positions seen by the
mid-block attention.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mirage.configs import FluxVAEConfig

NORM_EPS = 1e-6  # every GroupNorm of the published model


def norm_layer(groups: int, channels: int) -> nn.GroupNorm:
    # No explicit fp32 upcast: PyTorch's GroupNorm kernels already accumulate the statistics of bf16/fp16
    # input in fp32 (on CPU the bf16 result equals the fp32-then-cast one in all but ~2e-6 of elements, ~1e-3 on
    # the channels-last maps of a CPU decode), and an upcast copy would cost two fp32 copies of the largest
    # feature map (4 GB at 2048 px) and 4x time.
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """Two rounds of GroupNorm, SiLU, 3x3 conv, added to the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = norm_layer(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm_layer(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU and the residual sum work in place on temporaries: a fresh buffer of a full-resolution feature
        # map costs more in page faults (CPU) than the operation itself.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # [B, C_out, H, W]
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)  # [B, C_out, H, W]
        return h.add_(skip)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padding on the right and bottom only, as the original latent-diffusion VAE has it: even sides halve exactly.
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, C, H/2, W/2]


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all h*w positions, added to its input: the VAE's only global mixing."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = norm_layer(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list: the key reads to_out.0 as in diffusers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.group_norm(x), "b c h w -> b 1 (h w) c")  # [B, 1, L, C]: one head of width C
        # SDPA's default scale is C^-0.5, the head width, as in the reference.
        out = F.scaled_dot_product_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens))  # [B, 1, L, C]
        out = rearrange(self.to_out[0](out), "b 1 (h w) c -> b c h w", h=h, w=w)  # [B, C, h, w]
        return x + out


class MidBlock(nn.Module):
    """Resnet, attention (when the config has it), resnet, at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * layers
        self.resnets = nn.ModuleList(ResnetBlock(c_in, c_out, groups) for c_in, c_out in zip(widths, widths[1:]))
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])  # key downsamplers.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in [*self.resnets, *self.downsamplers]:
            x = module(x)  # [B, C_out, H, W], then [B, C_out, H/2, W/2] after the downsampler
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * layers
        self.resnets = nn.ModuleList(ResnetBlock(c_in, c_out, groups) for c_in, c_out in zip(widths, widths[1:]))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])  # key upsamplers.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in [*self.resnets, *self.upsamplers]:
            x = module(x)  # [B, C_out, H, W], then [B, C_out, 2H, 2W] after the upsampler
        return x


class Encoder(nn.Module):
    """Images [B, C_in, H, W] -> mean and log-variance of the latent [B, 2 * C_latent, h, w]."""

    def __init__(self, config: FluxVAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(c_in, c_out, config.layers_per_block, groups, downsample=level < len(widths) - 1)
            for level, (c_in, c_out) in enumerate(zip((widths[0], *widths[:-1]), widths))
        )
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = norm_layer(groups, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # [B, C_0, H, W]
        for block in self.down_blocks:
            x = block(x)  # ... -> [B, C_last, h, w]
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))  # [B, 2 * C_latent, h, w]


class Decoder(nn.Module):
    """Latents [B, C_latent, h, w] -> images [B, C_out, H, W]."""

    def __init__(self, config: FluxVAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups  # widest level first
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(c_in, c_out, config.layers_per_block + 1, groups, upsample=level < len(widths) - 1)
            for level, (c_in, c_out) in enumerate(zip((widths[0], *widths[:-1]), widths))
        )
        self.conv_norm_out = norm_layer(groups, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # [B, C_last, h, w]
        for block in self.up_blocks:
            x = block(x)  # ... -> [B, C_0, H, W]
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))  # [B, C_out, H, W]


class FluxVAE(nn.Module):
    """The FLUX.1 autoencoder: `encode` images to raw latents, `decode` raw latents to images.

    Raw means unscaled: PRX's transformer works on (z - shift_factor) * scaling_factor, and
    `mirage.autoencoder` applies that conversion for either VAE.
    """

    fp16_safe = False  # see the module docstring; read by mirage.precision.run_dtype

    def __init__(self, config: FluxVAEConfig = FluxVAEConfig()):
        super().__init__()
        self.config = config
        self.spatial_compression, self.latent_channels = config.spatial_compression, config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> raw latents [B, C_latent, H/f, W/f].

        The encoder predicts a diagonal Gaussian (mean, log-variance); this returns its mean, the mode,
        which is what a deterministic round trip or image-to-image needs.
        """
        moments = self.encoder(images)  # [B, 2 * C_latent, h, w]
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, _log_variance = moments.chunk(2, dim=1)  # [B, C_latent, h, w] each
        return mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, C_latent, h, w] -> images [B, 3, f*h, f*w] in about [-1, 1] (not clamped)."""
        if z.device.type == "cpu":
            # oneDNN's convolutions are faster on channels-last (NHWC) tensors, and every decoder layer keeps the
            # layout: the 512 px decode takes ~20% less time (measured in fp32). PyTorch's GroupNorm rounds a little
            # worse on NHWC (3e-5 relative to fp64 on a 512x512 map of mean 1 and std 0.3, 1e-7 on NCHW; a norm as
            # precise on NHWC, two-pass or through NCHW, measured 8x slower): a decode differs from diffusers' by
            # ~5e-6 relative (256 px, published architecture, random weights), inside the tests' 2e-5 parity bound.
            z = z.contiguous(memory_format=torch.channels_last)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).contiguous()
