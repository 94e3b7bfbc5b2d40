"""Frozen configurations of every Mirage component, with one preset per published variant.

Each dataclass checks its invariants where it is made, so an impossible configuration fails with a
clear ValueError before any weight is allocated.
"""

import math
import types
from dataclasses import asdict, dataclass, field, fields, replace


def _check_types(config) -> None:
    """Refuse a field whose value does not have its annotated type (ints for ints, finite numbers for floats;
    lists stand for tuples, as JSON has no tuples): config.json files are edited by hand, and 64.0 as a width or
    "x" as a base would otherwise fail deep inside torch, long after loading."""
    for f in fields(config):
        value = getattr(config, f.name)
        if not _has_type(value, f.type):
            name = f.type.__name__ if isinstance(f.type, type) else str(f.type)
            raise ValueError(f"{f.name} must be {'a finite ' if name == 'float' else ''}{name}, got {value!r}")


def _has_type(value, kind) -> bool:
    if isinstance(kind, types.UnionType):  # int | None
        return any(_has_type(value, option) for option in kind.__args__)
    if isinstance(kind, types.GenericAlias):  # tuple[int, ...]
        return isinstance(value, (tuple, list)) and all(_has_type(v, kind.__args__[0]) for v in value)
    if kind in (int, float) and isinstance(value, bool):
        return False  # a bool is an int to Python, never a size or a scale to us
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


# ---- transformer ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerConfig:
    """The PRX transformer; field names are the keys of the diffusers `transformer/config.json`."""

    in_channels: int = 16  # latent channels of the VAE (Flux 16, DC-AE 32)
    patch_size: int = 2  # latent pixels per token side (Flux 2 -> 16 image pixels, DC-AE 1 -> 32)
    context_in_dim: int = 2304  # width of the T5Gemma text embeddings
    hidden_size: int = 1792
    mlp_ratio: float = 3.5  # MLP width = int(hidden_size * mlp_ratio) = 6272
    num_heads: int = 28
    depth: int = 16
    axes_dim: tuple[int, ...] = (32, 32)  # RoPE channels per grid axis (row, column); sums to the head dim
    theta: int = 10000  # RoPE base
    time_factor: float = 1000.0  # sigma in [0, 1] is scaled back to the 0..1000 timestep range
    time_max_period: int = 10000  # longest period of the sinusoidal timestep embedding
    bottleneck_size: int | None = None  # two-layer img_in (patch -> bottleneck -> hidden) when set
    resolution_embeds: bool = False  # add an embedding of the latent (H, W) to the timestep vector

    def __post_init__(self):
        _check_types(self)
        sizes = (self.in_channels, self.patch_size, self.context_in_dim, self.hidden_size, self.num_heads, self.depth)
        if min(sizes) < 1 or self.mlp_ratio <= 0 or (self.bottleneck_size is not None and self.bottleneck_size < 1):
            raise ValueError(f"sizes, mlp_ratio and bottleneck_size must be positive: {self}")
        if min(self.theta, self.time_factor, self.time_max_period) <= 0:
            raise ValueError(f"theta, time_factor and time_max_period must be positive: {self}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        # RoPE rotates channel pairs over the 2-D patch grid: one even share of the head dim per axis.
        if len(self.axes_dim) != 2 or any(d < 2 or d % 2 for d in self.axes_dim) or sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must be two even sizes summing to the head dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @classmethod
    def from_diffusers(cls, d: dict) -> "TransformerConfig":
        """Read a diffusers `PRXTransformer2DModel` config.json dict (keys starting with "_" are metadata)."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unsupported PRX transformer config keys: {', '.join(unknown)}")
        if d.get("axes_dim") is not None:
            d["axes_dim"] = tuple(d["axes_dim"])
        else:
            d.pop("axes_dim", None)  # the reference reads null as its default [32, 32]
        return cls(**d)


PRX_FLUX = TransformerConfig()  # Photoroom/prx-*-t2i*: Flux VAE latents, 16 channels, 2x2 patches
PRX_DCAE = replace(PRX_FLUX, in_channels=32, patch_size=1)  # Photoroom/prx-512-t2i-dc-ae*: DC-AE latents


# ---- text encoder ---------------------------------------------------------------------------

SLIDING_ATTENTION, FULL_ATTENTION = "sliding_attention", "full_attention"  # transformers' layer_types names


def alternating_layer_types(num_layers: int) -> tuple[str, ...]:
    """Gemma-2's pattern, transformers' default when a config has no layer_types: sliding first, then full."""
    return tuple(SLIDING_ATTENTION if i % 2 == 0 else FULL_ATTENTION for i in range(num_layers))


@dataclass(frozen=True)
class TextEncoderConfig:
    """The T5Gemma encoder; field names are transformers' `T5GemmaModuleConfig` keys, defaults the
    encoder of google/t5gemma-2b-2b-ul2 (2.61B parameters, 589.8M of them the embedding)."""

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216  # gated GELU MLP width
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4  # grouped-query attention: 2 query heads share each key/value head
    head_dim: int = 256  # not hidden_size / heads: 8 x 256 = 2048 != 2304
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    query_pre_attn_scalar: float = 256  # attention scores are scaled by query_pre_attn_scalar ** -0.5
    attn_logit_softcapping: float | None = 50.0  # scores -> cap * tanh(scores / cap); None: no cap
    sliding_window: int | None = 4096  # sliding layers see keys with |i - j| <= sliding_window
    layer_types: tuple[str, ...] = alternating_layer_types(26)

    def __post_init__(self):
        _check_types(self)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        sizes = (self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.head_dim)
        scales = (self.rms_norm_eps, self.query_pre_attn_scalar, self.rope_theta)
        if min(sizes) < 1 or self.num_key_value_heads < 1 or min(scales) <= 0:
            raise ValueError(f"sizes, heads, eps, query_pre_attn_scalar and rope_theta must be positive: {self}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types names {len(self.layer_types)} layers, num_hidden_layers is {self.num_hidden_layers}")
        unknown = sorted(set(self.layer_types) - {SLIDING_ATTENTION, FULL_ATTENTION})
        if unknown:
            raise ValueError(f"unknown layer types {unknown}: expected {SLIDING_ATTENTION!r} or {FULL_ATTENTION!r}")
        if SLIDING_ATTENTION in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError(f"sliding layers need a positive sliding_window, got {self.sliding_window}")
        if self.attn_logit_softcapping is not None and self.attn_logit_softcapping <= 0:
            raise ValueError(f"attn_logit_softcapping must be positive or None, got {self.attn_logit_softcapping}")

    @classmethod
    def from_transformers(cls, d: dict) -> "TextEncoderConfig":
        """Read a transformers config.json dict: the composite `T5GemmaConfig` (model_type "t5gemma", the
        encoder under "encoder") or the encoder's own `T5GemmaModuleConfig` ("t5_gemma_module"), with
        `rope_parameters` (transformers 5.x) or `rope_theta` (4.x). A key left out means transformers'
        default, which is ours; keys that change nothing the encoder computes (token ids, dropout, the
        decoder's logit cap, cache flags) are ignored; options this port does not build raise."""
        if d.get("model_type") == "t5gemma":
            d = d["encoder"]
        elif d.get("model_type") != "t5_gemma_module":
            raise ValueError(f"expected a T5Gemma config (model_type 't5gemma' or 't5_gemma_module'), got {d.get('model_type')!r}")
        if d.get("is_decoder"):
            raise ValueError("this is a T5Gemma decoder config: the text encoder needs the encoder's")
        if d.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"only hidden_activation 'gelu_pytorch_tanh' is supported, got {d['hidden_activation']!r}")
        if d.get("attention_bias"):
            raise ValueError("attention_bias=True is not supported: T5Gemma projections have no biases")
        if d.get("rope_scaling") is not None:
            raise ValueError(f"rope_scaling is not supported, got {d['rope_scaling']}")
        values = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        rope = d.get("rope_parameters")
        if rope is not None:
            if rope.get("rope_type", "default") != "default":
                raise ValueError(f"only the default rotary embedding is supported, got rope_type {rope['rope_type']!r}")
            values["rope_theta"] = rope["rope_theta"]
        if values.get("layer_types") is None:
            values["layer_types"] = alternating_layer_types(values.get("num_hidden_layers", cls.num_hidden_layers))
        return cls(**values)


# ---- tokenizer ------------------------------------------------------------------------------

_UNSET_MAX_LENGTH = int(1e30)  # transformers' VERY_LARGE_INTEGER: a tokenizer_config.json without a real limit


@dataclass(frozen=True)
class TokenizerConfig:
    """How prompts become token ids, as PRX's GemmaTokenizerFast does it; field names are the keys of
    `tokenizer_config.json`."""

    add_bos_token: bool = True  # "<bos>" before the text: what PRX was trained with
    add_eos_token: bool = False
    padding_side: str = "left"  # GemmaTokenizerFast's class default; PRX's tokenizer_config.json does not set it
    model_max_length: int = 256  # PRX trains and samples with 256 tokens
    bos_token: str = "<bos>"
    eos_token: str = "<eos>"
    pad_token: str = "<pad>"

    def __post_init__(self):
        _check_types(self)
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.model_max_length < 1 + self.add_bos_token + self.add_eos_token:
            raise ValueError(f"model_max_length {self.model_max_length} leaves no room for text between <bos>/<eos>")

    @classmethod
    def from_tokenizer_config(cls, d: dict, tokenizer_json: dict | None = None) -> "TokenizerConfig":
        """Read a `tokenizer_config.json` dict, and the folder's `tokenizer.json` dict when it has one.

        As in transformers 5, a `tokenizer.json` post-processor decides <bos>/<eos> and the config's
        add_bos_token/add_eos_token are ignored. Without it the flags decide, and a missing flag keeps
        our default: transformers 5 would then add no <bos> at all, unlike the 4.x GemmaTokenizerFast
        that PRX was trained with. A key left out means the class default; options that change how
        transformers tokenizes in ways we do not reproduce raise."""
        if d.get("tokenizer_class", "GemmaTokenizer") not in ("GemmaTokenizer", "GemmaTokenizerFast"):
            raise ValueError(f"expected a Gemma tokenizer, got tokenizer_class {d['tokenizer_class']!r}")
        if d.get("truncation_side", "right") != "right":
            raise ValueError(f"only truncation_side 'right' is supported, got {d['truncation_side']!r}")
        if d.get("split_special_tokens"):
            raise ValueError("split_special_tokens=True is not supported: typed special tokens always become their ids")
        values = {k: d[k] for k in ("add_bos_token", "add_eos_token", "padding_side") if k in d}
        for key in ("bos_token", "eos_token", "pad_token"):
            if key in d:
                values[key] = _token_content(key, d[key])
        if d.get("model_max_length") is not None and d["model_max_length"] < _UNSET_MAX_LENGTH:
            values["model_max_length"] = d["model_max_length"]
        if tokenizer_json is not None:
            values.update(_specials_from_post_processor(tokenizer_json.get("post_processor")))
        return cls(**values)


def _token_content(key: str, value) -> str:
    """A special token as tokenizer_config.json stores it: a string, or a serialized AddedToken (4.x)."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise ValueError(f"tokenizer_config.json {key} must name a token, got {value!r}")
    return value


def _specials_from_post_processor(post_processor: dict | None) -> dict:
    """add_bos_token/add_eos_token (and the token names) from a tokenizer.json post-processor, which
    wraps one text as [special] $A [special]."""
    if post_processor is None:
        return {"add_bos_token": False, "add_eos_token": False}
    if post_processor.get("type") != "TemplateProcessing":
        raise ValueError(f"unsupported tokenizer.json post_processor {post_processor.get('type')!r}")
    single = post_processor["single"]
    text_at = [i for i, item in enumerate(single) if "Sequence" in item]
    if len(text_at) != 1 or text_at[0] > 1 or len(single) - text_at[0] > 2:
        raise ValueError(f"unsupported tokenizer.json template {single}: expected [<bos>] $A [<eos>]")
    before, after = single[: text_at[0]], single[text_at[0] + 1 :]
    values = {"add_bos_token": bool(before), "add_eos_token": bool(after)}
    if before:
        values["bos_token"] = before[0]["SpecialToken"]["id"]
    if after:
        values["eos_token"] = after[0]["SpecialToken"]["id"]
    return values


# ---- Flux VAE -------------------------------------------------------------------------------

# What diffusers' AutoencoderKL assumes for a key its config.json leaves out (SD-era files lack the
# quant-conv, shift and mid-attention keys), so a sparse file builds the model diffusers would build.
_AUTOENCODER_KL_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Keys that change nothing PRX computes: diffusers' own tile size, its upcast hint (PRXPipeline never
# upcasts) and latent statistics PRXPipeline does not read.
_AUTOENCODER_KL_IGNORED = {"sample_size", "force_upcast", "latents_mean", "latents_std"}


@dataclass(frozen=True)
class FluxVAEConfig:
    """The KL autoencoder of FLUX.1 (diffusers `AutoencoderKL`); the defaults are the published VAE."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one level each; all but the last resample 2x
    layers_per_block: int = 2  # resnets per encoder level; each decoder level has one more
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = False  # 1x1 conv after the encoder (SD-style VAEs have it, FLUX.1's does not)
    use_post_quant_conv: bool = False  # 1x1 conv before the decoder
    # The transformer sees (z - shift_factor) * scaling_factor, z the raw latent: unit variance, about zero mean.
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self):
        _check_types(self)
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"every block_out_channels entry must divide into {self.norm_num_groups} groups, got {channels}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be at least 1, got {self.layers_per_block}")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent cell along each side: every level but the last halves the resolution."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict) -> "FluxVAEConfig":
        """Read an AutoencoderKL config.json dict; raise on anything this port does not build."""
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"expected an AutoencoderKL config, got {d['_class_name']}")
        d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _AUTOENCODER_KL_IGNORED}
        unknown = sorted(set(d) - set(_AUTOENCODER_KL_DEFAULTS))
        if unknown:
            raise ValueError(f"unsupported AutoencoderKL config keys: {', '.join(unknown)}")
        d = {**_AUTOENCODER_KL_DEFAULTS, **d}
        levels = len(d["block_out_channels"])
        if list(d["down_block_types"]) != ["DownEncoderBlock2D"] * levels:
            raise ValueError(f"only {levels} x DownEncoderBlock2D is supported, got down_block_types {d['down_block_types']}")
        if list(d["up_block_types"]) != ["UpDecoderBlock2D"] * levels:
            raise ValueError(f"only {levels} x UpDecoderBlock2D is supported, got up_block_types {d['up_block_types']}")
        if d["act_fn"] != "silu":
            raise ValueError(f"only act_fn 'silu' is supported, got {d['act_fn']!r}")
        return cls(
            in_channels=d["in_channels"],
            out_channels=d["out_channels"],
            latent_channels=d["latent_channels"],
            block_out_channels=tuple(d["block_out_channels"]),
            layers_per_block=d["layers_per_block"],
            norm_num_groups=d["norm_num_groups"],
            mid_block_add_attention=d["mid_block_add_attention"],
            use_quant_conv=d["use_quant_conv"],
            use_post_quant_conv=d["use_post_quant_conv"],
            scaling_factor=d["scaling_factor"],
            shift_factor=0.0 if d["shift_factor"] is None else d["shift_factor"],  # None: no shift
        )


# ---- DC-AE ----------------------------------------------------------------------------------

DCAE_BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
DCAE_NORM_TYPES = ("rms_norm", "batch_norm")
DCAE_ACT_FNS = ("silu", "relu")

# What diffusers' AutoencoderDC assumes for a key its config.json leaves out (the published sana files
# omit the last three), so a sparse file builds the model diffusers would build.
_AUTOENCODER_DC_DEFAULTS = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "scaling_factor": 1.0,
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
}
_SANA_DCAE_STAGES = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3


@dataclass(frozen=True)
class DCAEConfig:
    """The Deep Compression Autoencoder (diffusers `AutoencoderDC`); defaults: dc-ae-f32c32-sana-1.1.

    Field names are the keys of the diffusers config.json. Every per-stage tuple has one entry per
    stage, highest resolution first; each stage but the last halves (encoder) or doubles (decoder) the
    resolution, so n stages compress 2^(n-1) times. A stage with 0 layers is allowed only first (the
    f32c32-in/mix releases): the encoder stem and the decoder head then do that stage's resampling.
    """

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32  # EfficientViT heads: stage width / attention_head_dim
    encoder_block_types: tuple[str, ...] = _SANA_DCAE_STAGES  # "ResBlock" or "EfficientViTBlock" per stage
    decoder_block_types: tuple[str, ...] = _SANA_DCAE_STAGES
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    # Kernel sizes of the extra q/k/v aggregation branches of each EfficientViT stage (() for ResBlock stages).
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    downsample_block_type: str = "conv"  # stride-2 conv, or "pixel_unshuffle": conv then 2x2 space-to-channel
    upsample_block_type: str = "interpolate"  # nearest 2x then conv, or "pixel_shuffle": conv then channel-to-space
    decoder_norm_types: tuple[str, ...] = ("rms_norm",) * 6  # per stage; the encoder always uses rms_norm
    decoder_act_fns: tuple[str, ...] = ("silu",) * 6  # ResBlock activation per stage; the encoder's is silu
    encoder_out_shortcut: bool = True  # latent += channel-group means of the last features
    decoder_in_shortcut: bool = True  # first features += the latent's channels, each repeated
    decoder_conv_act_fn: str = "relu"  # between the final norm and the output conv
    # The transformer sees z * scaling_factor (unit variance). DC-AE has no shift; the field exists so the
    # shared latent <-> pixel code reads both VAEs the same way: z = latents / scaling_factor + shift_factor.
    scaling_factor: float = 0.41407
    shift_factor: float = 0.0

    def __post_init__(self):
        _check_types(self)
        for name in ("encoder_block_types", "decoder_block_types", "encoder_block_out_channels",
                     "decoder_block_out_channels", "encoder_layers_per_block", "decoder_layers_per_block",
                     "decoder_norm_types", "decoder_act_fns"):  # fmt: skip
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("encoder_qkv_multiscales", "decoder_qkv_multiscales"):
            object.__setattr__(self, name, tuple(tuple(scales) for scales in getattr(self, name)))
        for side in ("encoder", "decoder"):
            self._check_side(side)
        if len(self.encoder_block_out_channels) != len(self.decoder_block_out_channels):
            raise ValueError("the encoder and the decoder must have the same number of stages (the same compression)")
        if self.downsample_block_type not in ("conv", "pixel_unshuffle"):
            raise ValueError(f"downsample_block_type must be conv or pixel_unshuffle, got {self.downsample_block_type!r}")
        if self.upsample_block_type not in ("interpolate", "pixel_shuffle"):
            raise ValueError(f"upsample_block_type must be interpolate or pixel_shuffle, got {self.upsample_block_type!r}")
        if any(norm not in DCAE_NORM_TYPES for norm in self.decoder_norm_types):
            raise ValueError(f"decoder_norm_types must be among {DCAE_NORM_TYPES}, got {self.decoder_norm_types}")
        if any(act not in DCAE_ACT_FNS for act in self.decoder_act_fns + (self.decoder_conv_act_fn,)):
            raise ValueError(f"activations must be among {DCAE_ACT_FNS}, got {self.decoder_act_fns}, {self.decoder_conv_act_fn!r}")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")
        self._check_resampling()

    def _check_side(self, side: str) -> None:
        widths = getattr(self, f"{side}_block_out_channels")
        kinds, depths = getattr(self, f"{side}_block_types"), getattr(self, f"{side}_layers_per_block")
        multiscales = getattr(self, f"{side}_qkv_multiscales")
        per_stage = [kinds, depths, multiscales]
        if side == "decoder":
            per_stage += [self.decoder_norm_types, self.decoder_act_fns]
        if len(widths) < 2 or any(len(values) != len(widths) for values in per_stage):
            raise ValueError(f"the {side} needs at least 2 stages and one entry per stage in every per-stage field")
        if min(widths) < 1 or min(depths) < 0 or min(depths[1:]) < 1:
            raise ValueError(f"{side} widths must be positive; only the first stage may have 0 layers: {widths}, {depths}")
        for width, kind, scales in zip(widths, kinds, multiscales):
            if kind not in DCAE_BLOCK_TYPES:
                raise ValueError(f"{side} block type must be among {DCAE_BLOCK_TYPES}, got {kind!r}")
            if kind == "ResBlock" and scales:
                raise ValueError(f"qkv_multiscales apply to EfficientViTBlock stages only, got {scales} on a ResBlock")
            if kind == "EfficientViTBlock" and width % self.attention_head_dim:
                raise ValueError(f"EfficientViT width {width} is not divisible by attention_head_dim {self.attention_head_dim}")
            if any(k < 1 or k % 2 == 0 for k in scales):  # odd kernels keep the grid size with padding k // 2
                raise ValueError(f"qkv_multiscales kernel sizes must be odd, got {scales}")

    def _check_resampling(self) -> None:
        """The shortcuts regroup channels: each width must divide evenly into the next."""
        enc, dec, z = self.encoder_block_out_channels, self.decoder_block_out_channels, self.latent_channels
        # (in, out) widths of the down and up blocks that carry a shortcut (an empty first stage has none)
        down = list(zip(enc[:-1], enc[1:]))[1 if self.encoder_layers_per_block[0] == 0 else 0 :]
        up = list(zip(dec[1:], dec[:-1]))[1 if self.decoder_layers_per_block[0] == 0 else 0 :]
        if any((4 * c_in) % c_out for c_in, c_out in down) or any((4 * c_out) % c_in for c_in, c_out in up):
            raise ValueError(f"stage widths {enc} / {dec} cannot be regrouped 4:1 by the resampling shortcuts")
        if self.downsample_block_type == "pixel_unshuffle" and any(c % 4 for c in enc[1:]):
            raise ValueError(f"pixel_unshuffle downsampling needs encoder widths divisible by 4, got {enc}")
        if enc[-1] % z or dec[-1] % z:
            raise ValueError(f"the last stage widths {enc[-1]}, {dec[-1]} must be multiples of latent_channels {z}")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict) -> "DCAEConfig":
        """Read an AutoencoderDC config.json dict; raise on anything this port does not build."""
        if d.get("_class_name", "AutoencoderDC") != "AutoencoderDC":
            raise ValueError(f"expected an AutoencoderDC config, got {d['_class_name']}")
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(d) - set(_AUTOENCODER_DC_DEFAULTS))
        if unknown:
            raise ValueError(f"unsupported AutoencoderDC config keys: {', '.join(unknown)}")
        d = {**_AUTOENCODER_DC_DEFAULTS, **d}
        stages = {side: len(d[f"{side}_block_out_channels"]) for side in ("encoder", "decoder")}
        # A single string stands for every stage, as in diffusers.
        for key, side in (("encoder_block_types", "encoder"), ("decoder_block_types", "decoder"),
                          ("decoder_norm_types", "decoder"), ("decoder_act_fns", "decoder")):  # fmt: skip
            if isinstance(d[key], str):
                d[key] = (d[key],) * stages[side]
        # diffusers builds a strided conv for any downsample type but "pixel_unshuffle" (the sana files say
        # "Conv") and pixel shuffling for any upsample type but "interpolate"; only the real names pass here.
        if str(d["downsample_block_type"]).lower() == "conv":
            d["downsample_block_type"] = "conv"
        return cls(**d)


DCAE_SANA_1_1 = DCAEConfig()  # mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers, the VAE of Photoroom/prx-*-dc-ae*
# mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers: 1.1 retrained only the decoder's weights; the architecture,
# the latent space and its scaling factor are unchanged, so both releases share one config.
DCAE_SANA_1_0 = DCAE_SANA_1_1


# ---- checkpoint (all components together) ---------------------------------------------------


VAE_TYPES = ("flux", "dc-ae")


@dataclass(frozen=True)
class SamplingConfig:
    """The flow-matching schedule and the checkpoint's recommended sampling settings."""

    shift: float = 3.0  # sigma' = shift * sigma / (1 + (shift - 1) * sigma): more steps at high noise
    num_train_timesteps: int = 1000
    num_inference_steps: int = 28  # distilled checkpoints: 8
    # Photoroom's recommendation (diffusers' PRX docs: 28 steps, cfg 5.0; PRXPipeline's own default is 4.0);
    # distilled checkpoints: 1.0 (no unconditional pass)
    guidance_scale: float = 5.0
    default_sample_size: int = 512  # the resolution the checkpoint was trained at (256, 512 or 1024)

    def __post_init__(self):
        _check_types(self)
        if not (0 < self.shift < math.inf) or self.num_train_timesteps < 1:
            raise ValueError(
                f"shift must be finite and > 0 and num_train_timesteps >= 1, got {self.shift}, {self.num_train_timesteps}"
            )
        if self.num_inference_steps < 1 or not (1 <= self.guidance_scale < math.inf):
            raise ValueError(
                f"need num_inference_steps >= 1 and a finite guidance_scale >= 1, got {self.num_inference_steps}, "
                f"{self.guidance_scale}"
            )
        if self.default_sample_size < 1:
            raise ValueError(f"default_sample_size must be positive, got {self.default_sample_size}")


@dataclass(frozen=True)
class MirageConfig:
    """Everything `config.json` of a converted checkpoint holds: one config per component."""

    transformer: "TransformerConfig"
    text_encoder: "TextEncoderConfig"
    tokenizer: "TokenizerConfig"
    vae_type: str  # "flux" (AutoencoderKL, 8x, 16 channels) or "dc-ae" (AutoencoderDC, 32x, 32 channels)
    vae: "FluxVAEConfig | DCAEConfig"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        if self.vae_type not in VAE_TYPES:
            raise ValueError(f"unknown VAE type {self.vae_type!r}: expected one of {', '.join(VAE_TYPES)}")
        expected = FluxVAEConfig if self.vae_type == "flux" else DCAEConfig
        if not isinstance(self.vae, expected):
            raise ValueError(f"vae_type {self.vae_type!r} needs a {expected.__name__}, got {type(self.vae).__name__}")
        if self.transformer.in_channels != self.vae.latent_channels:
            raise ValueError(
                f"the transformer takes {self.transformer.in_channels} latent channels but the VAE makes "
                f"{self.vae.latent_channels}: these weights do not belong together"
            )
        if self.transformer.context_in_dim != self.text_encoder.hidden_size:
            raise ValueError(
                f"the transformer expects {self.transformer.context_in_dim}-dim text embeddings but the text "
                f"encoder makes {self.text_encoder.hidden_size}: these weights do not belong together"
            )

    @property
    def pixel_multiple(self) -> int:
        """Image heights and widths the model makes are multiples of this: one latent patch in pixels."""
        return self.vae.spatial_compression * self.transformer.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MirageConfig":
        vae_config = FluxVAEConfig if d["vae_type"] == "flux" else DCAEConfig
        return cls(
            transformer=_from_fields(TransformerConfig, d["transformer"]),
            text_encoder=_from_fields(TextEncoderConfig, d["text_encoder"]),
            tokenizer=_from_fields(TokenizerConfig, d["tokenizer"]),
            vae_type=d["vae_type"],
            vae=_from_fields(vae_config, d["vae"]),
            sampling=_from_fields(SamplingConfig, d.get("sampling", {})),
        )


def _from_fields(cls, d: dict):
    """Build a config dataclass from a JSON dict (lists become tuples, as the frozen fields hold them)."""
    return cls(**{k: _as_tuples(v) for k, v in d.items()})


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value
