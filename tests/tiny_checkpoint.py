"""Tiny random PRX checkpoints in the published diffusers layout, made with the oracles themselves.

`save_tiny_prx` trains a small Gemma-like SentencePiece model, builds a random `PRXPipeline` (every
weight randomised, including those the reference zero-initialises) and saves it with `save_pretrained`,
so the converter and the pipeline are tested on exactly what diffusers writes and reads.
"""

import io
import json
import random
import shutil
from functools import lru_cache
from pathlib import Path

import sentencepiece
import torch
from diffusers import AutoencoderDC, AutoencoderKL, FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXTransformer2DModel
from transformers import GemmaTokenizerFast
from transformers.models.t5gemma.configuration_t5gemma import T5GemmaConfig, T5GemmaModuleConfig
from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

from parity import randomize_

# Gemma's tokenizer conventions: fixed special ids, byte fallback, no dummy prefix, identity normalisation.
GEMMA_LIKE_SPM = dict(
    model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
    bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True, add_dummy_prefix=False,
    normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
    split_digits=True, user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
)  # fmt: skip

# What PRX's tokenizer_config.json says that matters; no padding_side: the class default (left) holds.
PRX_TOKENIZER_CONFIG = {
    "tokenizer_class": "GemmaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "model_max_length": 256,
}

TEXT_WIDTH = 32


def corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """Made-up captions with the characters prompts contain: accents, CJK, emoji, digits, odd spacing."""
    rng = random.Random(seed)
    syllables = "ka to ri na mo se lu pa in an er th he ou st ch".split()
    words = [*"the a photo of cat dog red blue sunset over mountains portrait woman city night painting".split(),
             *"in style watercolor oil canvas café naïve résumé über straße 東京 夜景 猫 犬 😀 🎨 ✨ hello world".split(),
             *"12345 2024 3.14 x-ray e-mail".split()]  # fmt: skip
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    separators = [" "] * 6 + ["  ", "   ", "    ", ", ", ". ", "\n", "\t"]
    return ["".join(rng.choice(words) + rng.choice(separators) for _ in range(rng.randint(3, 15))) for _ in range(lines)]


@lru_cache(maxsize=None)
def train_sentencepiece(vocab_size: int = 800, **changes) -> bytes:
    """A serialized Gemma-like SentencePiece BPE model trained on `corpus()` (cached per process)."""
    model = io.BytesIO()
    options = {**GEMMA_LIKE_SPM, "vocab_size": vocab_size, "character_coverage": 0.999, **changes}
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, minloglevel=2, num_threads=2, **options
    )
    return model.getvalue()


def tokenizer_folder(folder: Path, config_changes: dict | None = None) -> Path:
    """tokenizer.model + tokenizer_config.json, as PRX's tokenizer folder (saved by transformers 4)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(train_sentencepiece())
    (folder / "tokenizer_config.json").write_text(json.dumps({**PRX_TOKENIZER_CONFIG, **(config_changes or {})}))
    return folder


def tiny_text_encoder(vocab_size: int, seed: int = 1) -> T5GemmaEncoder:
    module = T5GemmaModuleConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )  # fmt: skip
    # The composite config fills in what the encoder module reads from it (dropout rates and the like).
    config = T5GemmaConfig(encoder=module, decoder=module, vocab_size=vocab_size).encoder
    return randomize_(T5GemmaEncoder(config).eval(), seed)


def tiny_transformer(vae_type: str, seed: int = 2) -> PRXTransformer2DModel:
    in_channels, patch_size = (16, 2) if vae_type == "flux" else (32, 1)
    model = PRXTransformer2DModel(
        in_channels=in_channels, patch_size=patch_size, context_in_dim=TEXT_WIDTH, hidden_size=64,
        mlp_ratio=2.0, num_heads=2, depth=2, axes_dim=[16, 16],
    )  # fmt: skip
    return randomize_(model.eval(), seed)


def tiny_vae(vae_type: str, seed: int = 3):
    """8x Flux-style KL VAE, or a 32x DC-AE, both with a handful of channels."""
    if vae_type == "flux":
        vae = AutoencoderKL(
            latent_channels=16, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
        )  # fmt: skip
    else:
        vae = AutoencoderDC(
            latent_channels=32, attention_head_dim=8,
            encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            encoder_block_out_channels=(8, 8, 16, 16, 32, 32), decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
            encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6,
            encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
            decoder_act_fns="silu", scaling_factor=0.41407,
        )  # fmt: skip
    return randomize_(vae.eval(), seed)


def tiny_prx_pipeline(folder: Path, vae_type: str = "flux") -> PRXPipeline:
    """A random PRXPipeline with a 256 px default sample size, its tokenizer trained here."""
    tokenizer = GemmaTokenizerFast.from_pretrained(tokenizer_folder(folder / "tokenizer_source"))
    return PRXPipeline(
        transformer=tiny_transformer(vae_type),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=2.5),  # not mirage's default 3.0
        text_encoder=tiny_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        vae=tiny_vae(vae_type),
        default_sample_size=256,
    )


def save_tiny_prx(folder: Path, vae_type: str = "flux", dtype: torch.dtype = torch.float32) -> PRXPipeline:
    """Save a tiny random PRX checkpoint in diffusers layout to `folder`; returns the pipeline."""
    pipe = tiny_prx_pipeline(folder.parent / f"{folder.name}_parts", vae_type).to(dtype=dtype)
    pipe.save_pretrained(folder)
    # As Photoroom publishes it: a composite T5GemmaConfig beside the encoder weights, loaded through
    # diffusers' own T5GemmaEncoder wrapper (`["prx", "T5GemmaEncoder"]`), which takes its `encoder` part.
    module = pipe.text_encoder.config.to_dict()
    T5GemmaConfig(encoder=module, decoder=module, vocab_size=module["vocab_size"]).save_pretrained(folder / "text_encoder")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = ["prx", "T5GemmaEncoder"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    # Published PRX tokenizer folders were saved by transformers 4: tokenizer.model, no tokenizer.json.
    shutil.rmtree(folder / "tokenizer")
    tokenizer_folder(folder / "tokenizer")
    return pipe
