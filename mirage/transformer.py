"""The Mirage (PRX) denoising transformer: latents, a noise level and text embeddings in, velocity out.

Follows diffusers' `PRXTransformer2DModel` (0.42), whose state-dict keys it shares. It is not a two-stream
MMDiT: the text embeddings go through `txt_in` once, each block only turns them into attention keys and values,
and only the image tokens are queries and get updated. RoPE rotates the image queries and keys over the 2-D
patch grid; text keys get no position. A block is adaLN-modulated attention plus a gated GELU-tanh MLP.

How it deviates, without changing what it computes:
- `encode_text` computes the text side (projection, every block's keys with their norm, and values) once per
  generation, and drops the key columns that are padding in every row; `forward` reuses the result at every step.
- The adaLN vectors depend only on sigma (and the latent size, with resolution embeddings), so `modulate`
  computes them apart from the blocks: a sampler can compute them for a whole schedule before its loop and
  call `forward_modulated`.
- RoPE tables are built in fp32 (the reference uses float64, and float32 only where a device lacks it, as MPS
  does), cached per grid size and device, and held as complex64 rotations, so RoPE is one complex product per tensor.
- Fewer passes and buffers, same arithmetic: gated residuals are one `addcmul` each; adaLN scale and shift, the
  q/k norm weight and the MLP's gate * up product are applied in place on fresh temporaries.

Shapes: B batch, L_img image tokens (h * w), L_txt text tokens (L before `encode_text` drops the columns that are
padding in every row), D hidden size, H heads, Dh head dim, C latent channels, h/w patch grid, p patch size
(latents are [B, C, h*p, w*p]), N noise levels.
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mirage.configs import TransformerConfig

TIME_EMBED_DIM = 256  # width of the sinusoidal timestep (and resolution) embedding


# ---- the text side and the modulation, computed apart from the image stream -------------------------------------


@dataclass(frozen=True)
class TextContext:
    """Everything the transformer needs from the text, computed once per generation by `encode_text`."""

    keys: tuple[Tensor, ...]  # one per block: [B, H, L_txt, Dh], RMS-normed
    values: tuple[Tensor, ...]  # one per block: [B, H, L_txt, Dh]
    mask: Tensor | None  # [B, L_txt] bool, True at real tokens; None when no row has padding

    @property
    def batch_size(self) -> int:
        return self.values[0].shape[0]

    def key_mask(self, num_img_tokens: int) -> Tensor | None:
        """SDPA mask [B, 1, 1, L_txt + L_img] over the [text; image] keys, or None when nothing is masked.

        It stays broadcastable over heads and queries, so no [B, H, L_img, L_txt + L_img] mask is ever materialised and
        fused kernels remain usable.
        """
        if self.mask is None:
            return None
        image_keys = self.mask.new_ones(self.mask.shape[0], num_img_tokens)  # image keys are never padding
        return torch.cat([self.mask, image_keys], dim=1)[:, None, None, :]  # [B, 1, 1, L_txt + L_img]


@dataclass(frozen=True)
class Modulation:
    """The adaLN shift/scale/gate vectors of every block and of the final layer, for N noise levels.

    N is 1 (broadcast over the batch), the batch, or a whole schedule (then `step(i)` picks one level).
    """

    blocks: Tensor  # [depth, 6, N, 1, D]: attention shift, scale, gate, then MLP shift, scale, gate
    final: Tensor  # [2, N, 1, D]: shift, scale

    def step(self, i: int) -> "Modulation":
        """The vectors of the i-th noise level, still broadcastable over the batch."""
        return Modulation(self.blocks[:, :, i : i + 1], self.final[:, i : i + 1])


# ---- primitives ------------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float, scale: float = 1.0) -> Tensor:
    """Sinusoidal embedding [N, dim] of t [N], cosines first; frequencies max_period^(-i / (dim / 2)). fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs * scale  # [N, dim/2]; multiplied in the reference's order
    return torch.cat([args.cos(), args.sin()], dim=-1)  # [N, dim]


@lru_cache(maxsize=16)
def rope_table(h: int, w: int, axes_dim: tuple[int, int], theta: float, device: torch.device) -> Tensor:
    """The RoPE rotations [h*w, Dh/2] of an h x w patch grid, tokens in row-major order, as unit complex numbers
    cos + i sin (complex64: fp32 parts).

    The first axes_dim[0] / 2 channel pairs rotate with the row index, the rest with the column index; each
    axis has its own frequencies theta^(-2j / axes_dim[axis]).
    """
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    angles = []
    for pos, dim in zip((rows, cols), axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)  # [dim/2]
        angles.append(pos.reshape(-1, 1) * freqs)  # [h*w, dim/2]
    angles = torch.cat(angles, dim=-1)  # [h*w, Dh/2]
    return torch.polar(torch.ones_like(angles), angles)  # [h*w, Dh/2] complex


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate each channel pair (2i, 2i+1) of x [B, H, L_img, Dh] (fp32) by the angles in rope [L_img, Dh/2].

    Read as the complex number x_2i + i x_2i+1, a pair is rotated by one complex product: a single pass over x,
    where the real form (four products, two sums, then interleaving) takes several and costs ~10x more on CPU.
    """
    pairs = torch.view_as_complex(rearrange(x, "b h l (d two) -> b h l d two", two=2))  # [B, H, L_img, Dh/2]
    return rearrange(torch.view_as_real(pairs * rope), "b h l d two -> b h l (d two)")  # [B, H, L_img, Dh]


def ada_layer_norm(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: (1 + scale) * LayerNorm(x) + shift over D, the norm without affine parameters (adaLN supplies them),
    eps 1e-6 as trained.

    The kernel accumulates its statistics in fp32 for half-precision inputs. Scale and shift are applied in
    place on the norm's fresh output, rounding as the reference's out-of-place ops do, without two more
    [B, L_img, D] buffers (fresh large buffers cost page faults on CPU).
    """
    return F.layer_norm(x, x.shape[-1:], eps=1e-6).mul_(1 + scale).add_(shift)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale over the head dim, for queries and keys.

    Computed in fp32 and RETURNED in fp32: the image queries and keys go on to RoPE, also fp32, and the caller
    casts back once.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).mul_(self.weight.float())


class MLPEmbedder(nn.Module):
    """Linear, SiLU, linear: lifts a sinusoidal embedding to the hidden size."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_size)
        self.out_layer = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class ResolutionEmbedder(nn.Module):
    """Embeds the latent size (h*p, w*p) into a vector added to the timestep vector (PRX-7B "vec" conditioning)."""

    def __init__(self, hidden_size: int, max_period: float):
        super().__init__()
        self.max_period = max_period
        self.mlp = MLPEmbedder(TIME_EMBED_DIM, hidden_size)

    def forward(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """[1, D], broadcast over the batch: every image of a batch has the same size."""
        size = torch.tensor([height, width], dtype=torch.float32, device=device)
        emb = timestep_embedding(size, TIME_EMBED_DIM // 2, self.max_period)  # [2, 128]
        return self.mlp(rearrange(emb, "two c -> 1 (two c)").to(dtype))  # [1, D]; height half first


# ---- blocks ----------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Image queries attend over [text keys; image keys].

    Text tokens are keys and values only (no text queries, so the text stream never changes): their keys are
    RMS-normed like the image keys but get no RoPE, as text has no place on the image grid.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d, dh = config.hidden_size, config.head_dim
        self.num_heads = config.num_heads
        self.img_qkv_proj = nn.Linear(d, 3 * d, bias=False)
        self.norm_q = RMSNorm(dh)
        self.norm_k = RMSNorm(dh)
        self.txt_kv_proj = nn.Linear(d, 2 * d, bias=False)
        self.norm_added_k = RMSNorm(dh)
        self.to_out = nn.ModuleList([nn.Linear(d, d, bias=False)])  # a list only for the checkpoint key to_out.0

    def text_kv(self, txt: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, H, L_txt, Dh] of projected text tokens txt [B, L_txt, D]."""
        k, v = rearrange(self.txt_kv_proj(txt), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        return self.norm_added_k(k).to(v.dtype), v

    def forward(self, x: Tensor, txt_k: Tensor, txt_v: Tensor, rope: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = rearrange(self.img_qkv_proj(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        # q is a strided view of the projection until here; in half precision the cast lays it out head by head
        # for free, which PyTorch's CPU flash kernel reads ~8% faster in bf16 (k and v are laid out so by the
        # concatenation). In fp32 there is no cast, and the kernel reads either layout as fast.
        q = apply_rope(self.norm_q(q), rope).to(x.dtype, memory_format=torch.contiguous_format)  # [B, H, L_img, Dh]
        k = apply_rope(self.norm_k(k), rope).to(x.dtype)
        k = torch.cat([txt_k, k], dim=2)  # [B, H, L_txt + L_img, Dh]
        v = torch.cat([txt_v, v], dim=2)  # [B, H, L_txt + L_img, Dh]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, L_img, Dh]
        return self.to_out[0](rearrange(out, "b h l d -> b l (h d)"))  # [B, L_img, D]


class BlockModulation(nn.Module):
    """The six adaLN vectors of a block from the conditioning vector."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.lin = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, vec: Tensor) -> Tensor:
        return rearrange(self.lin(F.silu(vec)), "n (six d) -> six n 1 d", six=6)  # [N, D] -> [6, N, 1, D]


class Block(nn.Module):
    """adaLN-modulated attention, then an adaLN-modulated gated GELU-tanh MLP, each gated into the residual."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d, d_mlp = config.hidden_size, config.mlp_hidden_size
        self.attention = Attention(config)
        self.gate_proj = nn.Linear(d, d_mlp, bias=False)
        self.up_proj = nn.Linear(d, d_mlp, bias=False)
        self.down_proj = nn.Linear(d_mlp, d, bias=False)
        self.modulation = BlockModulation(d)

    def forward(
        self, x: Tensor, mod: Tensor, txt_k: Tensor, txt_v: Tensor, rope: Tensor, mask: Tensor | None
    ) -> Tensor:
        """x [B, L_img, D] with this block's modulation mod [6, B or 1, 1, D] -> [B, L_img, D]."""
        attn_shift, attn_scale, attn_gate, mlp_shift, mlp_scale, mlp_gate = mod
        h = ada_layer_norm(x, attn_shift, attn_scale)
        x = torch.addcmul(x, attn_gate, self.attention(h, txt_k, txt_v, rope, mask))  # x + gate * attn, one pass
        h = ada_layer_norm(x, mlp_shift, mlp_scale)
        # in place: the product needs no second [B, L_img, mlp_hidden] buffer (fresh large buffers cost page faults)
        hidden = F.gelu(self.gate_proj(h), approximate="tanh").mul_(self.up_proj(h))
        return torch.addcmul(x, mlp_gate, self.down_proj(hidden))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a projection of each token back to its patch of latent pixels."""

    def __init__(self, hidden_size: int, patch_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_dim)
        # a Sequential only for the checkpoint key adaLN_modulation.1
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def modulation(self, vec: Tensor) -> Tensor:
        return rearrange(self.adaLN_modulation(vec), "n (two d) -> two n 1 d", two=2)  # [N, D] -> [2, N, 1, D]

    def forward(self, x: Tensor, mod: Tensor) -> Tensor:
        shift, scale = mod
        return self.linear(ada_layer_norm(x, shift, scale))  # [B, L_img, C p p]


# ---- the model -------------------------------------------------------------------------------------------------


class MirageTransformer(nn.Module):
    """The PRX transformer. Parameter names equal diffusers' `PRXTransformer2DModel` state-dict keys."""

    fp16_safe = True  # LayerNorm/RMSNorm statistics and RoPE run in fp32; activations stay in range

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        if config.bottleneck_size is None:
            self.img_in = nn.Linear(config.patch_dim, d)
        else:  # two linears with nothing between: a low-rank patch projection for large patches
            bottleneck = config.bottleneck_size
            self.img_in = nn.Sequential(nn.Linear(config.patch_dim, bottleneck), nn.Linear(bottleneck, d))
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, d)
        self.txt_in = nn.Linear(config.context_in_dim, d)
        self.resolution_embedder = ResolutionEmbedder(d, config.time_max_period) if config.resolution_embeds else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(d, config.patch_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.txt_in.weight.dtype

    def encode_text(self, text_embeds: Tensor, text_mask: Tensor | None = None) -> TextContext:
        """The text side of a generation, from text_embeds [B, L, context_in_dim] and text_mask [B, L] (True at
        real tokens; None when nothing is padded). Rows may have different lengths: each keeps its own mask."""
        shape = tuple(text_embeds.shape)
        if len(shape) != 3 or shape[-1] != self.config.context_in_dim:
            raise ValueError(f"text_embeds must be [B, L, {self.config.context_in_dim}], not {shape}")
        if text_mask is not None:
            if text_mask.shape != shape[:2]:
                raise ValueError(f"text_mask {tuple(text_mask.shape)} does not fit text_embeds {shape}")
            text_mask = text_mask.to(device=text_embeds.device, dtype=torch.bool)
            # A key that is padding in every row has zero weight in every softmax: drop it before any work.
            keep = text_mask.any(dim=0)  # [L]
            text_embeds, text_mask = text_embeds[:, keep], text_mask[:, keep]  # [B, L_txt, ...]
            if text_mask.all():
                text_mask = None  # nothing left to mask: SDPA may pick its fused kernels
        txt = self.txt_in(text_embeds)  # [B, L_txt, D]
        keys, values = zip(*(block.attention.text_kv(txt) for block in self.blocks))
        return TextContext(keys, values, text_mask)

    def modulate(self, sigma: Tensor, height: int, width: int) -> Modulation:
        """The adaLN vectors for noise levels sigma [N] (= timestep / 1000) and latents of size height x width."""
        if sigma.ndim != 1:
            raise ValueError(f"sigma must be 1-D [N], got shape {tuple(sigma.shape)}")
        # time_factor (1000) takes sigma back to the training timestep range the sinusoid was built for.
        t_emb = timestep_embedding(sigma, TIME_EMBED_DIM, self.config.time_max_period, scale=self.config.time_factor)
        vec = self.time_in(t_emb.to(self.dtype))  # [N, D]
        if self.resolution_embedder is not None:
            vec = vec + self.resolution_embedder(height, width, vec.device, vec.dtype)
        blocks = torch.stack([block.modulation(vec) for block in self.blocks])  # [depth, 6, N, 1, D]
        return Modulation(blocks, self.final_layer.modulation(vec))

    def forward(self, latents: Tensor, sigma: Tensor, text: TextContext) -> Tensor:
        """The velocity v = eps - x0 [B, C, h*p, w*p] of latents [B, C, h*p, w*p] at noise levels sigma [B] or [1]
        (= timestep / 1000), given the text context of the same B rows."""
        return self.forward_modulated(latents, self.modulate(sigma, *latents.shape[-2:]), text)

    def forward_modulated(self, latents: Tensor, mod: Modulation, text: TextContext) -> Tensor:
        """`forward` with the modulation of this step already computed by `modulate` (N = B or 1)."""
        b, c, height, width = latents.shape
        p = self.config.patch_size
        if c != self.config.in_channels or height % p or width % p:
            expected = f"[B, {self.config.in_channels}, H, W] with H and W multiples of {p}"
            raise ValueError(f"latents must be {expected}, not {tuple(latents.shape)}")
        if text.batch_size != b:
            raise ValueError(f"the text context has {text.batch_size} rows but the latents {b}")
        h, w = height // p, width // p
        x = self.img_in(rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p))  # [B, L_img, D]
        rope = rope_table(h, w, self.config.axes_dim, self.config.theta, latents.device)  # [L_img, Dh/2]
        mask = text.key_mask(h * w)  # [B, 1, 1, L_txt + L_img] or None
        for block, block_mod, txt_k, txt_v in zip(self.blocks, mod.blocks, text.keys, text.values):
            x = block(x, block_mod, txt_k, txt_v, rope, mask)
        x = self.final_layer(x, mod.final)  # [B, L_img, C p p]
        return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=h, p=p, q=p)  # [B, C, h*p, w*p]

