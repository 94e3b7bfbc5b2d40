"""A full-size PRX checkpoint with random weights, in diffusers layout, built once and cached on disk.

Speed does not depend on what the weights are, only on their shapes, so the benchmark needs no download:
the published hyper-parameters (1.17B transformer, T5Gemma-2B encoder, FLUX.1 VAE or DC-AE f32c32) with
random bf16 weights, saved by the oracles' own `save_pretrained` exactly as `tests/tiny_checkpoint.py` does
for the tiny test checkpoints, then converted with `convert_weights.py`. The tokenizer is the small
Gemma-like SentencePiece model of the tests (tokenisation time is negligible; what counts is the number of
tokens, which the benchmark controls). Components are built one at a time on the meta device and then
materialised in bf16, so building never holds more than one of them (the encoder: 5.2 GB).
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mirage.configs import PRX_DCAE, PRX_FLUX, VAE_TYPES  # noqa: E402

# The oracles (diffusers, transformers) and the converter are imported only when a checkpoint is built: the
# benchmark's workers for our side import this module too, and the oracles would add ~200 MB to their RSS.

DEFAULT_CACHE = Path.home() / ".cache" / "mirage-bench"
HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"  # read by PyTorch's CPU allocator

# The published VAE configs: black-forest-labs/FLUX.1-dev vae/ and mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers.
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
)  # fmt: skip
DC_AE = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)  # fmt: skip


@torch.no_grad()
def random_bf16(make, seed: int) -> torch.nn.Module:
    """make() built on the meta device, then given random bf16 storage: N(0, 1/fan_in) matrices keep
    activations at unit scale through deep stacks; vectors (biases, norm scales) N(0, 0.5^2), as
    `tests/parity.randomize_` draws them, but in place, without a full-size fp32 copy."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = make()
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")  # non-persistent buffers (RoPE inverse frequencies) are not saved
    gen = torch.Generator().manual_seed(seed)
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            std = 1 / tensor[0].numel() ** 0.5 if tensor.ndim >= 2 else 0.5
            tensor.normal_(0, std, generator=gen)
    return model.eval()


def save_text_encoder(folder: Path) -> None:
    """The encoder half of google/t5gemma-2b-2b-ul2, loaded by diffusers through `["prx", "T5GemmaEncoder"]`."""
    from transformers.models.t5gemma.configuration_t5gemma import T5GemmaConfig
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    config = T5GemmaConfig()  # transformers' defaults are the 2B-2B model
    random_bf16(lambda: T5GemmaEncoder(config.encoder), seed=1).save_pretrained(folder)
    config.save_pretrained(folder)  # the composite config, as Photoroom publishes it


def transformer_config(vae_type: str) -> dict:
    preset = PRX_FLUX if vae_type == "flux" else PRX_DCAE
    return dict(
        in_channels=preset.in_channels, patch_size=preset.patch_size, context_in_dim=preset.context_in_dim,
        hidden_size=preset.hidden_size, mlp_ratio=preset.mlp_ratio, num_heads=preset.num_heads, depth=preset.depth,
        axes_dim=list(preset.axes_dim), theta=preset.theta,
    )  # fmt: skip


def build_prx(folder: Path, vae_type: str, text_encoder: Path) -> None:
    """Write a PRX folder in diffusers layout; the text encoder is a symlink to a shared copy."""
    from diffusers import AutoencoderDC, AutoencoderKL, FlowMatchEulerDiscreteScheduler, PRXTransformer2DModel
    from tiny_checkpoint import tokenizer_folder

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    transformer = random_bf16(lambda: PRXTransformer2DModel(**transformer_config(vae_type)), seed=2)
    transformer.save_pretrained(tmp / "transformer")
    del transformer
    vae_class, vae_config = (AutoencoderKL, FLUX_VAE) if vae_type == "flux" else (AutoencoderDC, DC_AE)
    random_bf16(lambda: vae_class(**vae_config), seed=3).save_pretrained(tmp / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(tmp / "scheduler")
    tokenizer_folder(tmp / "tokenizer")
    (tmp / "text_encoder").symlink_to(text_encoder.resolve(), target_is_directory=True)
    index = {
        "_class_name": "PRXPipeline",
        "_diffusers_version": "0.42.1",
        "default_sample_size": 512,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["prx", "T5GemmaEncoder"],
        "tokenizer": ["transformers", "GemmaTokenizerFast"],
        "transformer": ["diffusers", "PRXTransformer2DModel"],
        "vae": ["diffusers", vae_class.__name__],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    tmp.rename(folder)


def ensure_checkpoint(cache: Path, vae_type: str) -> tuple[Path, Path]:
    """(diffusers folder, converted mirage folder) for `vae_type`, built and converted on first use."""
    if vae_type not in VAE_TYPES:
        raise ValueError(f"vae_type must be one of {VAE_TYPES}, got {vae_type!r}")
    cache.mkdir(parents=True, exist_ok=True)
    text_encoder = cache / "t5gemma-2b-encoder"
    if not (text_encoder / "config.json").is_file():
        print(f"building the random T5Gemma-2B encoder in {text_encoder} (once) ...", flush=True)
        partial = cache / "t5gemma-2b-encoder.partial"
        shutil.rmtree(partial, ignore_errors=True)
        save_text_encoder(partial)
        partial.rename(text_encoder)
    prx = cache / f"prx-{vae_type}"
    if not (prx / "model_index.json").is_file():
        print(f"building the random full-size PRX checkpoint in {prx} (once) ...", flush=True)
        build_prx(prx, vae_type, text_encoder)
    mirage = cache / f"mirage-{vae_type}"
    if not (mirage / "config.json").is_file():
        print(f"converting it to {mirage} (once) ...", flush=True)
        convert(prx, mirage)
    return prx, mirage


def convert(prx: Path, mirage: Path) -> None:
    """convert_weights.py's conversion, in this process, which leaves the environment as it found it.

    The converter asks for 2 MB pages when imported (`mirage.use_huge_pages` sets THP_MEM_ALLOC_ENABLE), and the
    benchmarks' worker processes inherit this one's environment: a run that had to convert would otherwise
    measure both sides under another setting than the runs after it."""
    setting = os.environ.get(HUGE_PAGES)
    try:
        import convert_weights

        convert_weights.main([str(prx), str(mirage), "--force"])
    finally:
        if setting is None:
            os.environ.pop(HUGE_PAGES, None)
        else:
            os.environ[HUGE_PAGES] = setting
