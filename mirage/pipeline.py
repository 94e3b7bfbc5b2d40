"""Text to image with Mirage: prompts -> T5Gemma embeddings -> flow-matching denoising -> VAE decode.

Follows diffusers' `PRXPipeline` (0.42.1) step for step, with these deliberate differences:
- every image gets its own prompt's embeddings AND mask (the reference repeat-interleaves embeddings but
  tiles masks, so with several prompts and several images each, images get another prompt's mask), and
  the timestep is broadcast to the batch (the reference's `.repeat(2)` crashes any CFG batch > 1);
- prompts are encoded only up to the longest one in the batch instead of 256 tokens: the encoder's
  output at real tokens does not depend on padding and the transformer masks padded keys, so the
  result is the same for a fraction of the work;
- the text side of the transformer (projection, per-block keys/values) is computed once per call;
- a binned image resized back to the request is never a pixel short of it (see `resize_and_crop`);
- decodes above 1024x1024 px run in overlapping tiles (see `mirage.autoencoder.decode_latents`);
- prompt cleaning keeps the curly quotes diffusers' copy lost, as training did (see `mirage.prompt_cleaning`);
- the Euler update runs wholly in fp32, and every step's modulation is computed before the loop (see
  `mirage.sampling`).

Shapes: B prompts, K images per prompt, N = B * K images, L text tokens, D text width,
C latent channels, h/w latent grid, H/W pixels (H'/W': the size generated at, when binning changes it).
"""

import gc
import logging
import math
import numbers
import operator
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import lora, memory
from .autoencoder import decode_latents, to_unit_range
from .configs import MirageConfig
from .loading import CheckpointError, check_file, load_model, loaded_bytes, read_config
from .precision import DTYPES, dtype_name, pipeline_dtype, run_dtype
from .prompt_cleaning import basic_clean, clean_prompt
from .sampling import denoise, flow_match_sigmas, require_cuda
from .text_encoder import T5GemmaEncoder
from .tokenizer import GemmaTokenizer
from .transformer import MirageTransformer
from .vae_dcae import DCAE
from .vae_flux import FluxVAE

log = logging.getLogger("mirage")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SEED_RANGE = 2**64  # what torch.Generator.manual_seed takes (it also takes negative seeds; we do not)
MAX_SIDE = 16384  # pixels: beyond this a request is a typo, and resizing a binned image to it would exhaust memory
OFFLOAD_MODES = (None, "model", "sequential")
COMPONENTS = ("transformer", "text_encoder", "vae")
MODEL_CLASSES = {"transformer": MirageTransformer, "text_encoder": T5GemmaEncoder}
VAE_CLASSES = {"flux": FluxVAE, "dc-ae": DCAE}
# What `compile=True` compiles in each model: the repeated blocks, where the transformer and text encoder spend
# their time, and the VAE's decoder.
COMPILED_PARTS = {"transformer": "blocks", "text_encoder": "layers", "vae": "decoder"}

# Aspect-ratio bins (height / width -> (height, width)) per training resolution: the shapes the model
# saw in training. A request is generated at the nearest bin and resized back. Same bins as the reference.
ASPECT_RATIO_BINS = {
    256: {0.46: (160, 352), 0.6: (192, 320), 0.78: (224, 288), 1.0: (256, 256), 1.29: (288, 224),
          1.67: (320, 192), 2.2: (352, 160)},
    512: {0.5: (352, 704), 0.57: (384, 672), 0.6: (384, 640), 0.68: (416, 608), 0.78: (448, 576),
          0.88: (480, 544), 1.0: (512, 512), 1.13: (544, 480), 1.29: (576, 448), 1.46: (608, 416),
          1.67: (640, 384), 1.75: (672, 384), 2.0: (704, 352)},
    1024: {0.49: (704, 1440), 0.52: (736, 1408), 0.53: (736, 1376), 0.57: (768, 1344), 0.59: (768, 1312),
           0.62: (800, 1280), 0.67: (832, 1248), 0.68: (832, 1216), 0.78: (896, 1152), 0.83: (928, 1120),
           0.94: (992, 1056), 1.0: (1024, 1024), 1.06: (1056, 992), 1.13: (1088, 960), 1.21: (1120, 928),
           1.29: (1152, 896), 1.37: (1184, 864), 1.46: (1216, 832), 1.5: (1248, 832), 1.71: (1312, 768),
           1.75: (1344, 768), 1.87: (1376, 736), 1.91: (1408, 736), 2.05: (1440, 704)},
}  # fmt: skip


def nearest_bin(height: int, width: int, sample_size: int) -> tuple[int, int]:
    """The (height, width) bin whose aspect ratio is closest to the request's (first one on ties)."""
    if sample_size not in ASPECT_RATIO_BINS:
        raise ValueError(
            f"resolution binning knows sample sizes {sorted(ASPECT_RATIO_BINS)}, not {sample_size}: "
            "pass use_resolution_binning=False (--no-binning)"
        )
    bins = ASPECT_RATIO_BINS[sample_size]
    ratio = min(bins, key=lambda r: abs(r - height / width))
    return bins[ratio]


def resize_and_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale [N, 3, H', W'] so it covers (height, width), then centre-crop to it, as the reference does.

    The reference truncates the scaled size, which can fall one pixel short of the request (768x1344 scaled to
    cover 500x900 is 514x899); its crop then starts at -1 and keeps a single column. Never below the request here.
    """
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    new_h, new_w = max(int(h * ratio), height), max(int(w * ratio), width)  # truncated like the reference
    images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return images[..., top : top + height, left : left + width]  # [N, 3, height, width]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [0, 1] -> N RGB images (rounded to the nearest of 256 levels)."""
    pixels = (images.float().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()  # [N, H, W, 3]
    return [Image.fromarray(p) for p in pixels]


def component(config: MirageConfig, name: str) -> tuple[type[nn.Module], object]:
    """The model class and config of a checkpoint component: "transformer", "text_encoder" or "vae"."""
    model_class = VAE_CLASSES[config.vae_type] if name == "vae" else MODEL_CLASSES[name]
    return model_class, getattr(config, name)  # MirageConfig names its fields after the components


def load_tokenizer(model: Path | bytes, config: MirageConfig, source: str) -> GemmaTokenizer:
    """The checkpoint's tokenizer, or a CheckpointError if it is unreadable or makes ids its text encoder lacks."""
    try:
        tokenizer = GemmaTokenizer(model, config.tokenizer)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}: use the model's own tokenizer") from None
    if tokenizer.vocab_size > config.text_encoder.vocab_size:
        raise CheckpointError(
            f"{source} has {tokenizer.vocab_size} pieces, but the text encoder embeds only "
            f"{config.text_encoder.vocab_size}: the tokenizer belongs to another model"
        )
    return tokenizer


def check_finite(tensor: torch.Tensor, what: str, causes: str = "the weights (convert the checkpoint again)") -> None:
    """A FloatingPointError naming the model that made inf/NaN and what to try, instead of a black image: a wider
    dtype first where there is one, then the `causes` that are that model's."""
    if torch.isfinite(tensor).all():
        return
    wider = {torch.float16: "run it in bf16 or fp32 (--dtype)", torch.bfloat16: "run it in fp32 (--dtype fp32)"}
    advice = f"{wider[tensor.dtype]}, or check {causes}" if tensor.dtype in wider else f"check {causes}"
    raise FloatingPointError(f"{what} hold inf/NaN in {dtype_name(tensor.dtype)}: {advice}")


def check_given(tensor: torch.Tensor | None, name: str) -> None:
    """Inputs given by the caller: inf/NaN there is theirs, not a model's."""
    if tensor is not None and not torch.isfinite(tensor).all():
        raise ValueError(f"the given {name} hold inf/NaN: pass finite values")


def compile_model(model: nn.Module, name: str) -> nn.Module:
    """torch.compile the part of model `name` where its time goes, in place; -> the same model.

    Repeated blocks are compiled one by one rather than as a whole model: they share one compiled code (compile
    time is that of one block), which fuses what runs between the matrix products (norms, RoPE, modulation,
    gates) into a few kernels. The VAE's decoder, whose levels all differ, is compiled whole. Module names and
    state-dict keys do not change, so loading and LoRA are unaffected. The first call compiles (seconds on a
    GPU, minutes on a CPU), and so does the first with another prompt length or image size, which makes those
    sizes dynamic: later sizes reuse the code. The results equal eager mode's to rounding.
    """
    part = getattr(model, COMPILED_PARTS[name])
    for module in part if isinstance(part, nn.ModuleList) else [part]:
        module.compile()
    return model


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """The device named (default: cuda, mps, cpu), checked to be one this torch can use."""
    device = as_device(name) if name is not None else default_device()
    check_device(device)
    return device


def as_device(name: str | torch.device) -> torch.device:
    """torch.device(name), with check_device's message for a name torch does not know (torch's own lists its
    dozen device types)."""
    try:
        return torch.device(name)
    except RuntimeError:
        raise _not_ours(name) from None


def check_device(device: torch.device) -> None:
    """A ValueError now, rather than a traceback at the first tensor, for a device this torch cannot use."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device.type not in available:
        raise _not_ours(device)
    if device.type == "mps" and torch.backends.mps.is_built() and not available["mps"]:
        raise ValueError("torch sees no usable mps device (it needs Apple silicon, and macOS 14 or newer with torch "
                         ">= 2.9): use cpu")  # fmt: skip
    if not available[device.type]:
        raise ValueError(f"this torch build sees no {device.type} device: use cpu (or install a torch that has it)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"there is no {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _not_ours(device: str | torch.device) -> ValueError:
    return ValueError(f"device {str(device)!r} is not one mirage runs on: use cuda, mps or cpu")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators (what Photoroom recommends); fp32 on CPU, where many CPUs lack fast bf16 kernels (AVX2
    only) and those with them gain 1.9x (AVX-512 BF16) to ~4x (AMX): `--dtype bf16` asks for it there."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


class MiragePipeline:
    """The whole text-to-image path over one converted checkpoint folder (see `convert_weights.py`).

    Models load on first use, so the text encoder (the largest part) can be freed once prompts are encoded
    before the transformer is even read. `offload="model"` keeps every model in CPU memory and moves each to
    the device only while it runs; `offload="sequential"` keeps every weight in CPU memory and copies each
    part of a model (a block, a layer, the VAE's decoder) in while it runs (least device memory, slowest).
    """

    def __init__(
        self,
        folder: Path,
        config: MirageConfig,
        tokenizer: GemmaTokenizer,
        device: torch.device,
        dtype: torch.dtype,
        offload: str | None = None,
        keep_text_encoder: bool | None = None,
        compile: bool = False,
        cuda_graph: bool = False,
    ):
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        if cuda_graph:
            require_cuda(device)
            if offload == "sequential":
                raise ValueError(
                    "CUDA graphs cannot replay sequential offload's weight moves: use offload='model' (--offload model)"
                )
        if offload and device.type == "cpu":
            log.warning(f"offload={offload!r} saves no memory on the CPU: the models are in CPU memory already")
        if compile and offload == "sequential":
            raise ValueError(
                "compiled code cannot take in sequential offload's weight moves (each one breaks the graph): "
                "use offload='model' (--offload model) with compile"
            )
        self.folder, self.config, self.tokenizer = Path(folder), config, tokenizer
        self.device, self.dtype, self.offload, self.compile = device, dtype, offload, compile
        self.cuda_graph = cuda_graph
        self.keep_text_encoder = keep_text_encoder
        self.models: dict[str, nn.Module] = {}  # loaded on first use, see `model`
        # LoRAs loaded before the transformer is read: checked on a weightless copy of it, attached when it is read
        self.pending_loras: list[tuple[dict, float, str, str]] = []  # (state dict, scale, name, file)
        self.unread_transformer: MirageTransformer | None = None  # the weightless copy, holding those LoRAs
        self.denoising = False  # LoRAs must not change then: the text side and modulations are computed before

    @classmethod
    def from_pretrained(
        cls,
        path,
        device=None,
        dtype: torch.dtype | str | None = None,
        offload: str | None = None,
        keep_text_encoder: bool | None = None,
        compile: bool = False,
        cuda_graph: bool = False,
    ) -> "MiragePipeline":
        """Open a converted folder for `device` (default: cuda, mps, cpu) in `dtype` (torch.float32/bfloat16/float16
        or "fp32"/"bf16"/"fp16"; default: bf16 on GPUs, fp32 on CPU). Checks the folder now; reads the weights when
        each model is first used.

        keep_text_encoder: keep the text encoder loaded between calls (default: only when memory is ample).
        compile: torch.compile the transformer blocks, text-encoder layers and VAE decoder (`compile_model`).
        cuda_graph: replay each denoising step as a CUDA graph recorded at the first step (CUDA only).
        Both give the same images as eager mode, to rounding.
        """
        folder = Path(path)
        config = read_config(folder)
        for name in (*COMPONENTS, "tokenizer.model"):
            file = folder / (name if "." in name else f"{name}.safetensors")
            if not file.is_file():
                raise CheckpointError(f"{file} is missing: convert the checkpoint again (python convert_weights.py)")
        device = pick_device(device)
        if device.type in ("cpu", "mps"):  # "cpu:0" is the one CPU (and "mps:0" the one Apple GPU), and safetensors
            device = torch.device(device.type)  # before 0.8 knows them only as "cpu" and "mps"
        dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if dtype not in (None, *DTYPES.values()):
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or their torch dtypes, got {dtype!r}")
        tokenizer = load_tokenizer(folder / "tokenizer.model", config, source=str(folder / "tokenizer.model"))
        for name in COMPONENTS:  # from the files' headers: a file of another checkpoint fails now, not minutes later
            model_class, model_config = component(config, name)
            check_file(partial(model_class, model_config), folder / f"{name}.safetensors")
        dtype = pipeline_dtype(dtype or default_dtype(device), device)
        return cls(folder, config, tokenizer, device, dtype, offload, keep_text_encoder, compile, cuda_graph)

    @property
    def home(self) -> torch.device:
        """Where the weights are kept: CPU memory when offloading (parts visit the device to run), else the device."""
        return torch.device("cpu") if self.offload else self.device

    def model(self, name: str) -> nn.Module:
        """The transformer, text encoder or VAE, read from the folder the first time it is asked for."""
        if name not in self.models:
            self.models[name] = self._load(name)
        return self.models[name]

    def _load(self, name: str) -> nn.Module:
        model_class, model_config = component(self.config, name)
        dtype = run_dtype(model_class, self.dtype, self.device)
        path = self.folder / f"{name}.safetensors"
        model = load_model(partial(model_class, model_config), path, self.home, dtype)
        if name == "transformer":
            for state_dict, scale, lora_name, source in self.pending_loras:
                lora.add_lora(model, state_dict, scale, lora_name, source)
            self.pending_loras, self.unread_transformer = [], None
        if self.offload == "sequential":
            memory.stream_parts(model, self.device)
        if self.compile:
            compile_model(model, name)
        return model

    @property
    def transformer(self) -> MirageTransformer:
        return self.model("transformer")

    @property
    def text_encoder(self) -> T5GemmaEncoder:
        return self.model("text_encoder")

    @property
    def vae(self) -> nn.Module:
        return self.model("vae")

    def model_bytes(self, name: str) -> int:
        """The memory model `name` takes once loaded, in the dtype it runs in."""
        model_class, _ = component(self.config, name)
        return loaded_bytes(self.folder / f"{name}.safetensors", run_dtype(model_class, self.dtype, self.device))

    def running(self, name: str):
        """Context in which model `name` runs on the device: moved there for it with model offload; with sequential
        offload each part visits as it runs (and is sent home even if the call stops midway)."""
        return memory.on_device(self.model(name), self.device, self.offload)

    def free_text_encoder(self) -> None:
        """Drop the text encoder after encoding unless it was asked to stay, or memory is ample (CPU memory when
        offloading, as the models live there)."""
        keep = self.keep_text_encoder
        if keep is None:
            keep = memory.is_ample(self.home, sum(map(self.model_bytes, COMPONENTS)))
        if not keep and self.models.pop("text_encoder", None) is not None:
            gc.collect()  # a compiled module refers to itself (it keeps its compiled call): only a collection frees it

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], skip_text_cleaning: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean, tokenise and encode prompts in one batch: -> embeddings [B, L, D], mask [B, L] (bool).

        L is the longest prompt's token count, not the tokenizer's 256: see the module docstring.
        """
        clean = basic_clean if skip_text_cleaning else clean_prompt
        ids, mask = self.tokenizer([clean(p) for p in prompts], padding="longest")  # [B, L], [B, L]
        ids, mask = ids.to(self.device), mask.to(self.device)
        with self.running("text_encoder") as text_encoder:
            embeds = text_encoder(ids, mask)  # [B, L, D]
        check_finite(embeds, "the text encoder's embeddings")
        return embeds, mask

    def text_conditioning(
        self,
        prompt: list[str] | None,
        negative_prompt: list[str],
        num_images_per_prompt: int,
        guidance: bool,
        prompt_embeds=None,
        prompt_mask=None,
        negative_prompt_embeds=None,
        negative_prompt_mask=None,
        skip_text_cleaning: bool = False,
    ):
        """Text embeddings [2N or N, L, D] and mask [2N or N, L] for the batch [uncond images; cond images]
        (uncond only with guidance)."""
        check_given(prompt_embeds, "prompt_embeds")
        check_given(negative_prompt_embeds, "negative_prompt_embeds")
        if prompt_embeds is None:
            texts = (negative_prompt if guidance else []) + prompt  # negatives first, as the reference batches them
            try:
                embeds, mask = self.encode_prompts(texts, skip_text_cleaning)
            finally:  # after a failure too: an encoder that ran out of memory must not stay beside the transformer
                self.free_text_encoder()
            if guidance:
                negative_prompt_embeds, prompt_embeds = embeds.chunk(2)  # [B, L, D] each
                negative_prompt_mask, prompt_mask = mask.chunk(2)  # [B, L] each
            else:
                prompt_embeds, prompt_mask = embeds, mask
        groups = [(negative_prompt_embeds, negative_prompt_mask)] if guidance else []
        groups.append((prompt_embeds, prompt_mask))
        rows = [self._rows_per_image(embeds, mask, num_images_per_prompt) for embeds, mask in groups]
        length = max(embeds.shape[1] for embeds, _ in rows)
        embeds = torch.cat([_left_pad(embeds, length) for embeds, _ in rows])  # [2N or N, L, D]
        masks = torch.cat([_left_pad(mask, length) for _, mask in rows])  # [2N or N, L]
        return embeds, masks

    def _rows_per_image(self, embeds: torch.Tensor, mask: torch.Tensor | None, num_images_per_prompt: int):
        """Embeddings [B, L, D] and mask [B, L] (None: no padding) of B prompts -> [B * K, L, D], [B * K, L] on the
        device: each image gets its own prompt's embeddings AND mask. Given tensors may be on any device (a
        made-up mask on the CPU, another from `encode_prompts` on the GPU)."""
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool)
        elif mask.shape != embeds.shape[:2]:
            shapes = f"{tuple(mask.shape)} for embeddings {tuple(embeds.shape)}"
            raise ValueError(f"a text mask of shape {shapes}: a mask is [B, L] for embeddings [B, L, D]")
        embeds, mask = embeds.to(self.device, self.dtype), mask.to(self.device, torch.bool)
        if embeds.dtype == torch.float16:  # the text encoder ran in a wider dtype: its output may exceed fp16's range
            check_finite(embeds, "the text embeddings, cast to the transformer's dtype,")
        k = num_images_per_prompt
        return embeds.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | list[int] | None = None,
        num_images_per_prompt: int = 1,
        use_resolution_binning: bool = True,
        output_type: str = "pil",
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_mask: torch.Tensor | None = None,
        sigmas: list[float] | None = None,
        callback=None,
        progress: bool = True,
        skip_text_cleaning: bool = False,
    ):
        """Generate N = prompts x num_images_per_prompt images.

        Returns a list of PIL images ("pil"), an array [N, H, W, 3] in [0, 1] ("np"), a tensor [N, 3, H, W] in
        [0, 1] ("pt") or the final latents [N, C, h, w] at the binned size ("latent"). Unset sampling
        settings come from the checkpoint's config. `seed` draws the initial noise on the CPU in one draw
        for the whole batch, so a seed gives the same noise on every device; a list of N seeds draws each
        image's noise alone, exactly as a one-image call with that seed would, so a batch makes the images of
        one-at-a-time calls (to float rounding: batched kernels may round differently, ~1e-6); `generator` or
        `latents` may be given instead. `callback(step, sigma, latents, velocity)` runs at every step before its
        update: `latents` are x at `sigma` and `velocity` the guided v, so the model's predicted clean latents
        are x0 = latents - sigma * velocity.
        """
        sampling = self.config.sampling
        sigmas = _checked_sigmas(sigmas, num_inference_steps)
        steps = sampling.num_inference_steps if num_inference_steps is None else num_inference_steps
        steps = len(sigmas) if sigmas is not None else steps
        guidance_scale = sampling.guidance_scale if guidance_scale is None else guidance_scale
        request = (height or sampling.default_sample_size, width or sampling.default_sample_size)
        _check_text_source(prompt, negative_prompt, prompt_mask, negative_prompt_embeds, negative_prompt_mask)
        prompt, negative_prompt, batch = self._check_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, request=request,
            binning=use_resolution_binning, steps=steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, output_type=output_type,
        )  # fmt: skip
        seed = _checked_seed(seed, generator, latents)
        height, width = nearest_bin(*request, sampling.default_sample_size) if use_resolution_binning else request
        guidance = guidance_scale > 1.0
        n = batch * num_images_per_prompt
        self._check_room(n, height, width, guidance, use_resolution_binning)
        embeds, masks = self.text_conditioning(
            prompt, negative_prompt, num_images_per_prompt, guidance, prompt_embeds, prompt_mask,
            negative_prompt_embeds, negative_prompt_mask, skip_text_cleaning,
        )  # fmt: skip
        latents = self.initial_latents(n, height, width, seed, generator, latents)  # [N, C, h, w]
        schedule = flow_match_sigmas(steps, sampling.shift, sampling.num_train_timesteps, sigmas)
        latents = self._denoise(latents, schedule, embeds, masks, guidance_scale, callback, progress)
        if output_type == "latent":
            return latents
        return self._images(latents, request if use_resolution_binning else None, output_type)

    def _denoise(
        self, latents: torch.Tensor, schedule: torch.Tensor, embeds: torch.Tensor, masks: torch.Tensor,
        guidance_scale: float, callback, progress: bool,
    ) -> torch.Tensor:  # fmt: skip
        """The sampling loop, noise [N, C, h, w] to clean latents [N, C, h, w], checked finite, given the text rows
        [2N or N, L, D] and their masks [2N or N, L]; `denoising` keeps LoRAs from changing meanwhile."""
        with self.running("transformer") as transformer:
            self.denoising = True
            try:
                context = transformer.encode_text(embeds, masks)  # the text side, once for all steps
                latents = denoise(
                    transformer, latents, schedule, context, guidance_scale, callback, progress,
                    cuda_graph=self.cuda_graph, num_train_timesteps=self.config.sampling.num_train_timesteps,
                )  # fmt: skip
            finally:
                self.denoising = False
        check_finite(latents, "the transformer's latents", "the weights (convert the checkpoint again) and any huge "
                     "guidance or LoRA scale")  # fmt: skip
        return latents

    def _images(self, latents: torch.Tensor, request: tuple[int, int] | None, output_type: str):
        """Decoded latents [N, C, h, w] as `output_type` ("pil", "np" or "pt"), in [0, 1]; resized and cropped to
        the (height, width) `request` when the latents were generated at a binned size."""
        with self.running("vae") as vae:
            images = decode_latents(vae, latents)  # [N, 3, H', W'] in about [-1, 1]
        check_finite(images, "the VAE's images")
        if request is not None:
            images = resize_and_crop(images, *request)  # [N, 3, H, W]
        images = to_unit_range(images)
        if output_type == "pt":
            return images
        if output_type == "np":
            return images.float().permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3]
        return to_pil(images)

    def initial_latents(self, n, height, width, seed=None, generator=None, latents=None) -> torch.Tensor:
        """Gaussian noise [N, C, h, w], drawn on the CPU (or on a given generator's device) in one draw for the
        batch, or one per seed in a list, then moved to the device; or the given `latents`, checked."""
        factor = self.config.vae.spatial_compression
        shape = (n, self.config.vae.latent_channels, height // factor, width // factor)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} for this request, got {tuple(latents.shape)}")
            check_given(latents, "latents")
            return latents.to(self.device, self.dtype)
        if isinstance(seed, (list, tuple)):
            if len(seed) != n:
                raise ValueError(f"got {len(seed)} seeds for {n} images: pass one seed, or one per image")
            one = (1, *shape[1:])
            generators = [torch.Generator("cpu").manual_seed(s) for s in seed]
            noise = [torch.randn(one, generator=g, device="cpu", dtype=self.dtype) for g in generators]
            return torch.cat(noise).to(self.device)  # [N, C, h, w]
        if generator is None:
            generator = torch.Generator("cpu")
            if seed is None:
                generator.seed()  # a fresh random seed for this generator only, not the global one
            else:
                generator.manual_seed(seed)
        return torch.randn(shape, generator=generator, device=generator.device, dtype=self.dtype).to(self.device)

    def _check_inputs(
        self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, *, request, binning, steps,
        guidance_scale, num_images_per_prompt, output_type,
    ):  # fmt: skip
        """Validate a request up front; -> (prompts, negative prompts, number of prompts)."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if prompt is not None:
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompt or not all(isinstance(p, str) for p in prompt):
                raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        width = self.config.transformer.context_in_dim
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (embeds.ndim != 3 or embeds.shape[0] < 1 or embeds.shape[2] != width):
                raise ValueError(f"{name} must be [B >= 1, L, {width}], got {tuple(embeds.shape)}")
        batch = len(prompt) if prompt is not None else prompt_embeds.shape[0]
        negative_prompt = "" if negative_prompt is None else negative_prompt
        negative_prompt = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
        if not all(isinstance(p, str) for p in negative_prompt):
            raise ValueError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
        if len(negative_prompt) != batch:
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {batch} prompts: pass one, or one each")
        if prompt_embeds is not None and guidance_scale > 1 and negative_prompt_embeds is None:
            raise ValueError("with prompt_embeds and guidance_scale > 1, pass negative_prompt_embeds too")
        if negative_prompt_embeds is not None and len(negative_prompt_embeds) != batch:
            raise ValueError(f"got {len(negative_prompt_embeds)} negative prompt embeddings for {batch} prompts")
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if not isinstance(guidance_scale, numbers.Real) or not 1 <= guidance_scale < math.inf:
            raise ValueError(f"guidance_scale must be a number >= 1 (1 turns guidance off), got {guidance_scale!r}")
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if not all(map(_is_int, request)):
            raise ValueError(f"height and width must be integers, got {request[0]!r} and {request[1]!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        check_size(*request, self.config.pixel_multiple, binning)
        return prompt, negative_prompt, batch

    def _check_room(self, n: int, height: int, width: int, guidance: bool, binning: bool) -> None:
        """Refuse a call that needs more memory than the device could ever give it, before anything runs. On a CPU
        it would otherwise end with the OS killing the process unannounced: Linux grants allocations that each fit,
        and kills once they are used. The need is what each block's MLP holds at once, two [rows, L_img,
        mlp_hidden] tensors at the size generated at (2N rows under guidance): a lower bound, as the weights and
        every other activation come on top."""
        config = self.config.transformer
        tokens = (height // self.config.pixel_multiple) * (width // self.config.pixel_multiple)
        rows = 2 * n if guidance else n
        need = 2 * rows * tokens * config.mlp_hidden_size * self.dtype.itemsize
        have = memory.total_bytes(self.device)
        if have and need > have:
            images = f"{n} images at once, generated at" if n > 1 else "one image generated at"
            fewer = "make fewer images per call" + ("" if binning else ", or smaller ones")  # bins keep the area
            raise ValueError(
                f"{images} {height}x{width} px (height x width), need{'s' * (n == 1)} at least "
                f"{need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB this {self.device.type} can use: "
                f"{fewer} (sample.py: fewer --num-images, or a smaller --batch-size)"
            )

    # ---- LoRA (mirage/lora.py) ----

    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Add a LoRA file to the transformer, unfused; -> its name (default: the file's stem). A bad file raises a
        LoRAError naming the key and changes nothing. Before the transformer is read, the file is checked against a
        weightless (meta-device) copy of it and attached once the transformer is read, after the prompts are
        encoded, so that the text encoder can go first; the other LoRA methods read the transformer."""
        self._check_not_denoising()
        name = name or Path(path).stem
        if "transformer" in self.models:
            return lora.load_lora(self.transformer, path, scale, name)
        if self.unread_transformer is None:
            with torch.device("meta"):
                self.unread_transformer = MirageTransformer(self.config.transformer)
        state_dict = lora.read_lora(path)
        lora.add_lora(self.unread_transformer, state_dict, scale, name, source=str(path))  # every check, names too
        self.pending_loras.append((state_dict, scale, name, str(path)))
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        self._check_not_denoising()
        lora.set_lora_scale(self.transformer, name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (default: all); the weights it touched return to their original bits."""
        self._check_not_denoising()
        lora.unload_lora(self.transformer, name)

    def fuse_lora(self, name: str | None = None) -> None:
        """Merge one loaded LoRA (default: all) into the transformer's weights: no cost per step."""
        self._check_not_denoising()
        lora.fuse_lora(self.transformer, name)

    def _check_not_denoising(self) -> None:
        if self.denoising:
            raise lora.LoRAError(
                "LoRAs cannot change during denoising (from a callback): the text side and every step's modulation "
                "are computed before the first step; change them between calls"
            )


def check_size(height: int, width: int, multiple: int, binning: bool) -> None:
    """A ValueError for an image size no call can make; without binning the size must be a whole number of latent
    patches (`multiple` pixels), as it is not rounded to a bin."""
    if not 1 <= min(height, width) <= max(height, width) <= MAX_SIDE:
        raise ValueError(f"height and width must be 1 to {MAX_SIDE} pixels, got {height}x{width}")
    if not binning and (height % multiple or width % multiple):
        raise ValueError(
            f"height and width must be multiples of {multiple} (VAE factor x patch size), "
            f"got {height}x{width}: round them, or keep resolution binning on"
        )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _checked_sigmas(sigmas, num_inference_steps) -> list[float] | None:
    """Custom noise levels (before the shift): a list of numbers in [0, 1], as many as num_inference_steps if given."""
    if sigmas is None:
        return None
    try:
        values = [float(s) for s in sigmas] if not isinstance(sigmas, (str, bytes)) else []
    except (TypeError, ValueError):
        values = []
    if not values or not all(0 <= v <= 1 for v in values):  # NaN fails both comparisons
        raise ValueError(f"sigmas must be a list of noise levels in [0, 1], got {sigmas!r}")
    if num_inference_steps is not None and num_inference_steps != len(values):
        raise ValueError(f"got {len(values)} sigmas and num_inference_steps={num_inference_steps}: pass one of them")
    return values


def _check_text_source(prompt, negative_prompt, prompt_mask, negative_prompt_embeds, negative_prompt_mask) -> None:
    """Text comes as prompts or as embeddings: what the other way is passed beside them would go unused (diffusers
    drops it silently)."""
    if prompt is not None:
        given = {"prompt_mask": prompt_mask, "negative_prompt_embeds": negative_prompt_embeds,
                 "negative_prompt_mask": negative_prompt_mask}  # fmt: skip
        unused = [name for name, value in given.items() if value is not None]
        if unused:
            verb = "goes" if len(unused) == 1 else "go"
            raise ValueError(f"{' and '.join(unused)} {verb} with prompt_embeds: with prompt, pass negative_prompt")
    elif negative_prompt and any([negative_prompt] if isinstance(negative_prompt, str) else negative_prompt):
        raise ValueError("negative_prompt goes with prompt: with prompt_embeds, pass negative_prompt_embeds")


def _checked_seed(seed, generator: torch.Generator | None, latents: torch.Tensor | None) -> int | list[int] | None:
    """`seed` (one, or a list of one per image) as Python ints, checked before any model runs. Seed, generator
    and latents each choose the initial noise: more than one would leave all but one unused."""
    choices = {"seed": seed, "generator": generator, "latents": latents}
    given = [name for name, value in choices.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"pass one of seed, generator and latents, not {' and '.join(given)}: each sets the noise")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be one torch.Generator, not a {type(generator).__name__}: "
                         "for one per image, pass seed=[...]")  # fmt: skip
    if seed is None:
        return None
    many = isinstance(seed, (list, tuple))
    try:  # integer-like values (numpy, 0-d tensors) become ints; floats are refused
        seeds = [operator.index(s) for s in (seed if many else [seed])]
    except TypeError:
        raise ValueError(f"seeds must be integers, got {seed!r}") from None
    bad = next((s for s in seeds if not 0 <= s < SEED_RANGE), None)
    if bad is not None:
        raise ValueError(f"seeds must be in [0, 2**64), got {bad}")
    return seeds if many else seeds[0]


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dim 1 on the left to `length` with zeros (False for masks), as the tokenizer pads by default."""
    pad = length - x.shape[1]
    return x if pad == 0 else torch.cat([x.new_zeros((x.shape[0], pad, *x.shape[2:])), x], dim=1)
