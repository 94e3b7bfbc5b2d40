"""The T5Gemma text encoder: the encoder half of google/t5gemma-2b-2b-ul2, a bidirectional Gemma-2 stack
whose last hidden state is Mirage's text conditioning.

Follows transformers' `T5GemmaEncoder` (models/t5gemma, 5.x) and keeps its parameter names, so the
`text_encoder/` weights of a PRX checkpoint load strictly. Per layer: RMSNorm -> grouped-query self-attention
with RoPE -> RMSNorm, added to the residual; RMSNorm -> gated GELU-tanh MLP -> RMSNorm, added to the residual.
Layers alternate between a sliding window and full attention, both bidirectional; a final RMSNorm ends it.

Deviations, none of which changes the fp32 result:
- Attention is written out, because soft-capped scores have no `scaled_dot_product_attention` form.
  RoPE runs in fp32 (cast back before the product); the Q K^T product runs in the activation dtype, as in
  the reference; the scaling, the soft-cap, the mask and the softmax then run in fp32, where the reference
  does all but the softmax in the activation dtype, so in bf16 ours is the more precise of the two.
- The query heads that share a key/value head are batched against it, never copying K and V per head.
- Padding is never computed: the real tokens of all prompts are packed into one sequence, each attending
  to its own prompt only, and scattered back to [B, L] at the end (zeros at padding, where the
  reference leaves meaningless values).
- Inference only: no dropout, no `inputs_embeds` or `position_ids` arguments (positions are 0..L-1
  whatever the padding, as in the reference).

dtype policy: float16 is never used for this model. The embedding is multiplied by sqrt(2304) = 48 and the
residual stream only grows: every branch is RMS-normed on its way out and scaled by a learned (1 + w)
before it is added, and trained Gemma models learn large post-norm weights and outlier channels. Gemma 3,
with the same sqrt(D) embeddings and sandwich norms, exceeds float16's 65504 (transformers #36822, #37226),
and Gemma-2 27B is documented to go wrong in float16. Random weights cannot show it (full size, random
weights: largest activation 37, float16 finite) and the real ones were not at hand, but the choice costs
nothing: bfloat16 has float32's range and float16's memory, and it is the dtype Photoroom recommends and
names its text tower after ("t5gemma2b-256-bf16"). So the class says `fp16_safe = False`, and
`mirage.precision.run_dtype` runs it in bfloat16 when float16 is asked (float32 without native bfloat16).

Shapes: B batch, L tokens, N real (unpadded) tokens of the whole batch, D width (hidden_size), I MLP width,
H query heads, Hkv key/value heads, G = H / Hkv query heads per key/value head, Dh head dim.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .configs import SLIDING_ATTENTION, TextEncoderConfig


class Embedding(nn.Embedding):
    """nn.Embedding that does not draw random values for a table on the meta device, where models are built
    before their weights are loaded: torch draws normal values on meta through Python code that imports its
    compiler first, which alone took ~2 s of every cold start (no other layer's initialisation does)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: statistics in fp32, scale stored as an offset from one, x * rms^-1 * (1 + w)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Gemma multiplies by the scale before casting back, not after (unlike Llama)
        return (x32 * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin [N, Dh] of token positions [N]; the frequencies repeat over both halves (rotate-half layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq  # [N, Dh/2]
    angles = torch.cat((angles, angles), dim=-1)  # [N, Dh]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (c, c + Dh/2) of x [..., N, Dh] by the position angles, in fp32."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-second, first), dim=-1) * sin).type_as(x)


def attention_bias(prompts: torch.Tensor, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Additive fp32 bias [1, 1, 1, N, N] for the scores [1, Hkv, G, N, N] of N packed tokens: 0 where query i
    sees key j, float32's minimum elsewhere.

    A token sees the tokens of its own prompt (`prompts` [N] says whose each is) and, with a window, only those
    at most `window` positions away (bidirectional and inclusive, as transformers 5.x).
    """
    visible = prompts[:, None] == prompts[None, :]  # [N, N]
    if window is not None:
        visible = visible & ((positions[:, None] - positions[None, :]).abs() <= window)
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
    return bias.masked_fill(~visible, torch.finfo(torch.float32).min)[None, None, None]  # [1, 1, 1, N, N]


class SelfAttention(nn.Module):
    """Bidirectional grouped-query attention with RoPE and tanh soft-capped scores, on the packed x [1, N, D]."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.query_pre_attn_scalar**-0.5  # Gemma scales by a configured constant, not head_dim
        self.softcap = config.attn_logit_softcapping
        d, h, hkv, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(d, h * dh, bias=False)
        self.k_proj = nn.Linear(d, hkv * dh, bias=False)
        self.v_proj = nn.Linear(d, hkv * dh, bias=False)
        self.o_proj = nn.Linear(h * dh, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]
        # query head h reads key/value head h // G, as the reference's repeat_kv pairs them; q [1, Hkv, G, N, Dh]
        q = rearrange(self.q_proj(x), "b l (hkv g dh) -> b hkv g l dh", hkv=self.kv_heads, dh=self.head_dim)
        k = rearrange(self.k_proj(x), "b l (hkv dh) -> b hkv l dh", dh=self.head_dim)  # [1, Hkv, N, Dh]
        v = rearrange(self.v_proj(x), "b l (hkv dh) -> b hkv l dh", dh=self.head_dim)  # [1, Hkv, N, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # the G queries of a group stacked along the token axis meet their shared keys in one matmul
        scores = q.flatten(2, 3) @ k.transpose(-1, -2)  # [1, Hkv, G*N, N]
        scores = scores.unflatten(2, (-1, seq_len)).float() * self.scale  # [1, Hkv, G, N, N]
        if self.softcap is not None:
            # Gemma-2 bounds the logits to (-cap, cap) smoothly; the mask is added after, as the reference does
            scores = torch.tanh(scores / self.softcap) * self.softcap
        weights = torch.softmax(scores + bias, dim=-1).to(v.dtype)
        out = weights.flatten(2, 3) @ v  # [1, Hkv, G*N, Dh]
        out = rearrange(out, "b hkv (g l) dh -> b l (hkv g dh)", l=seq_len)  # [1, N, H*Dh]
        return self.o_proj(out)  # [1, N, D]


class MLP(nn.Module):
    """Gated GELU (tanh approximation) feed-forward: down(gelu(gate(x)) * up(x))."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)  # [1, N, I]
        return self.down_proj(hidden)  # [1, N, D]


class EncoderLayer(nn.Module):
    """Gemma-2 block: each branch is RMS-normed on its way in AND on its way out, then added."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.self_attn = SelfAttention(config)
        self.pre_self_attn_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.post_self_attn_layernorm(self.self_attn(self.pre_self_attn_layernorm(x), cos, sin, bias))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class T5GemmaEncoder(nn.Module):
    """Token ids -> last hidden state; parameter names are those of transformers' `T5GemmaEncoder`."""

    fp16_safe = False  # see the module docstring; read by mirage.precision.run_dtype

    def __init__(self, config: TextEncoderConfig = TextEncoderConfig()):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] long, attention_mask [B, L] bool (True: a token, False: padding) -> [B, L, D].

        Outputs at padding positions are zeros. Outputs at token positions do not depend on how much padding
        there is nor on which side (RoPE sees only distances, padding is never attended to), so a batch may be
        padded to its longest prompt only.
        """
        if attention_mask.dtype != torch.bool or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
                f"got {attention_mask.dtype} {tuple(attention_mask.shape)}"
            )
        config = self.config
        batch, length = input_ids.shape
        # Only real tokens are encoded: the prompts are packed into one sequence of N tokens in which each token
        # attends to its own prompt only, so the work is that of N tokens, not of B x L (with CFG and the
        # default empty negative prompt, about half). Each token keeps the position it has in its padded row,
        # as the reference's position ids are 0..L-1 whatever the padding.
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)[attention_mask]  # [N]
        prompts = torch.arange(batch, device=input_ids.device)[:, None].expand(batch, length)[attention_mask]  # [N]
        x = self.embed_tokens(input_ids[attention_mask])[None]  # [1, N, D]
        # Gemma scales embeddings by sqrt(D); the reference rounds the factor to the activation dtype first
        x = x * torch.tensor(config.hidden_size**0.5, dtype=x.dtype)
        cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta)  # [N, Dh]
        full = attention_bias(prompts, positions, None)  # [1, 1, 1, N, N]
        sliding = attention_bias(prompts, positions, config.sliding_window)
        for layer, layer_type in zip(self.layers, config.layer_types):
            x = layer(x, cos, sin, sliding if layer_type == SLIDING_ATTENTION else full)
        out = x.new_zeros(batch, length, config.hidden_size)  # [B, L, D]
        out[attention_mask] = self.norm(x)[0]  # the N tokens back to their rows
        return out
