"""End-to-end parity: a converted tiny checkpoint through MiragePipeline makes the same images as
diffusers' PRXPipeline on the original folder, for the same seed, and is right where diffusers is wrong."""

import dataclasses
import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from mirage import pipeline, precision
from mirage.loading import CheckpointError
from mirage.pipeline import MiragePipeline, check_device, check_finite, nearest_bin, resize_and_crop
import tiny_checkpoint
from parity import max_rel_err

IMAGE_TOL = 2e-5  # max |ours - ref| on images in [0, 1] (measured: 1.6e-6)
LATENT_TOL = 2e-5  # relative, on latents (measured: 1.5e-6)
PROMPTS = ["a red fox in the snow, photo", "a watercolor painting of a lighthouse at night with stars and a moon"]


@pytest.fixture(scope="session")
def ref_flux(prx_flux):
    pipe = PRXPipeline.from_pretrained(prx_flux)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def ref_dcae(prx_dcae):
    pipe = PRXPipeline.from_pretrained(prx_dcae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def ours_flux(mirage_flux):
    return MiragePipeline.from_pretrained(mirage_flux, device="cpu")


@pytest.fixture(scope="session")
def ours_dcae(mirage_dcae):
    return MiragePipeline.from_pretrained(mirage_dcae, device="cpu")


def reference(pipe, prompt, seed=0, **kwargs):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, generator=generator, num_inference_steps=2, **kwargs).images


def ours(pipe, prompt, seed=0, **kwargs):
    return pipe(prompt, seed=seed, num_inference_steps=2, progress=False, **kwargs)


def constant_tensors(model: torch.nn.Module) -> list[str]:
    """Floating parameters and buffers holding one value throughout (RoPE's inv_freq is a table, not a weight)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors if t.is_floating_point() and t.numel() > 1 and "inv_freq" not in name
            and bool((t == t.flatten()[0]).all())]  # fmt: skip


def test_the_oracles_have_no_weight_left_as_initialised(monkeypatch):
    """diffusers and transformers start modulations at zero and norm scales at ones or zeros, where a bug on our side
    would not show: every tiny model the parity tests compare with has all of its weights drawn."""
    builders = [lambda: tiny_checkpoint.tiny_text_encoder(100)]
    builders += [lambda v=v: tiny_checkpoint.tiny_transformer(v) for v in ("flux", "dc-ae")]
    builders += [lambda v=v: tiny_checkpoint.tiny_vae(v) for v in ("flux", "dc-ae")]
    for build in builders:
        assert constant_tensors(build()) == []
    monkeypatch.setattr(tiny_checkpoint, "randomize_", lambda model, seed: model)  # as the libraries initialise
    left = constant_tensors(tiny_checkpoint.tiny_transformer("flux"))
    assert {"blocks.0.modulation.lin.weight", "blocks.0.attention.norm_q.weight"} <= set(left)


@pytest.mark.parametrize("vae", ["flux", "dcae"])
@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_images_and_latents_match_reference(request, vae, guidance):
    ref_pipe, our_pipe = request.getfixturevalue(f"ref_{vae}"), request.getfixturevalue(f"ours_{vae}")
    expected = reference(ref_pipe, PROMPTS[0], guidance_scale=guidance, output_type="pt")
    images = ours(our_pipe, PROMPTS[0], guidance_scale=guidance, output_type="pt")
    assert images.shape == expected.shape == (1, 3, 256, 256)
    assert (images - expected).abs().max().item() <= IMAGE_TOL
    expected = reference(ref_pipe, PROMPTS[0], guidance_scale=guidance, output_type="latent")
    latents = ours(our_pipe, PROMPTS[0], guidance_scale=guidance, output_type="latent")
    assert max_rel_err(latents, expected) <= LATENT_TOL


@pytest.mark.parametrize("prompt", ["", "a long caption, " * 100])
def test_an_empty_and_a_truncated_prompt_match_reference(ref_flux, ours_flux, prompt):
    """The empty prompt, and one past the 256 tokens the model reads (encoded here only up to the longest)."""
    ids, _ = ours_flux.tokenizer([prompt], max_length=1000, padding="longest")
    assert (ids.shape[1] > 256) == bool(prompt)
    expected = reference(ref_flux, prompt, guidance_scale=4.0, output_type="pt")
    images = ours(ours_flux, prompt, guidance_scale=4.0, output_type="pt")
    assert (images - expected).abs().max().item() <= IMAGE_TOL


@pytest.mark.parametrize("vae, height, width", [("flux", 200, 300), ("flux", 255, 257), ("dcae", 300, 200)])
def test_non_square_request_with_binning(request, vae, height, width):
    """A size off the bins (even off the patch grid) is generated at the nearest 256 bin, then resized and
    cropped back, for both VAEs."""
    ref_pipe, our_pipe = request.getfixturevalue(f"ref_{vae}"), request.getfixturevalue(f"ours_{vae}")
    kwargs = dict(height=height, width=width, guidance_scale=5.0)  # the defaults differ: diffusers' is 4
    expected = reference(ref_pipe, PROMPTS[1], output_type="pt", **kwargs)
    images = ours(our_pipe, PROMPTS[1], output_type="pt", **kwargs)
    assert images.shape == expected.shape == (1, 3, height, width)
    assert (images - expected).abs().max().item() <= IMAGE_TOL


def test_latents_stay_at_the_binned_size(ours_flux):
    """200x300 is generated at the nearest 256 bin, 192x320."""
    assert nearest_bin(200, 300, 256) == (192, 320)
    latents = ours(ours_flux, PROMPTS[1], height=200, width=300, output_type="latent")
    assert latents.shape == (1, 16, 192 // 8, 320 // 8)  # latents stay at the binned size


def test_bins_are_the_references_at_every_sample_size():
    """The 256, 512 and 1024 px tables (only 256 is generated with above) and the choice of bin equal PRXPipeline's."""
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.prx.pipeline_prx import ASPECT_RATIO_BINS as REFERENCE_BINS

    assert sorted(pipeline.ASPECT_RATIO_BINS) == sorted(REFERENCE_BINS) == [256, 512, 1024]
    for size, bins in REFERENCE_BINS.items():
        assert pipeline.ASPECT_RATIO_BINS[size] == {float(ratio): tuple(hw) for ratio, hw in bins.items()}, size
        # every bin, the midpoints between neighbours (ties: the first), and requests beyond both ends
        ratios = sorted(map(float, bins))
        requests = [(round(1000 * r), 1000) for r in ratios] + [(1, 4000), (4000, 1), (500, 900), (900, 500)]
        requests += [(round(10000 * (a + b) / 2), 10000) for a, b in zip(ratios, ratios[1:])]
        for height, width in requests:
            expected = tuple(PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins))
            assert nearest_bin(height, width, size) == expected, (size, height, width)


def realign_masks(pipe, num_images_per_prompt):
    """Patch diffusers' encode_prompt so masks follow the embeddings ([m0, m0, m1, m1], not [m0, m1, m0, m1])."""
    original = pipe.encode_prompt

    def encode_prompt(*args, **kwargs):
        outputs = list(original(*args, **kwargs))
        for i in (1, 3):  # the two masks, tiled by the reference
            if outputs[i] is not None:
                tiled = outputs[i].view(num_images_per_prompt, -1, outputs[i].shape[-1])  # [K, B, L]
                outputs[i] = tiled.transpose(0, 1).reshape(-1, outputs[i].shape[-1])  # [B * K, L]
        return tuple(outputs)

    pipe.encode_prompt = encode_prompt
    return original


def broadcast_timestep(module, args, kwargs):
    """diffusers builds the CFG timestep with .repeat(2), which only fits a batch of one image."""
    kwargs["timestep"] = kwargs["timestep"][:1].expand(kwargs["hidden_states"].shape[0])
    return args, kwargs


def test_several_prompts_and_images_match_patched_reference(ref_flux, ours_flux):
    """Two prompts of different lengths, a negative prompt, two images each, with CFG: equal to diffusers
    once its two batch bugs are patched; unpatched diffusers crashes (CFG) or mixes up masks (no CFG)."""
    kwargs = dict(negative_prompt="blurry, low quality", num_images_per_prompt=2, output_type="pt")
    with pytest.raises(RuntimeError):
        reference(ref_flux, PROMPTS, guidance_scale=4.0, **kwargs)
    unpatched = reference(ref_flux, PROMPTS, guidance_scale=1.0, **kwargs)

    original = realign_masks(ref_flux, 2)
    hook = ref_flux.transformer.register_forward_pre_hook(broadcast_timestep, with_kwargs=True)
    try:
        expected_cfg = reference(ref_flux, PROMPTS, guidance_scale=4.0, **kwargs)
        expected = reference(ref_flux, PROMPTS, guidance_scale=1.0, **kwargs)
    finally:
        hook.remove()
        ref_flux.encode_prompt = original

    images_cfg = ours(ours_flux, PROMPTS, guidance_scale=4.0, **kwargs)
    images = ours(ours_flux, PROMPTS, guidance_scale=1.0, **kwargs)
    assert images_cfg.shape == (4, 3, 256, 256)
    assert (images_cfg - expected_cfg).abs().max().item() <= IMAGE_TOL
    assert (images - expected).abs().max().item() <= IMAGE_TOL
    assert (images - unpatched).abs().max().item() > 10 * IMAGE_TOL  # the reference's mask mix-up shows


def test_encode_prompts_matches_reference_encode_prompt(ref_flux, ours_flux):
    """Ours encodes up to the longest prompt; at real tokens it equals diffusers' 256-token encoding."""
    prompts = ["Buy “SALE” now!", PROMPTS[1], "<b>a photo</b> of https://example.com a cat"]
    ref_embeds, ref_mask, ref_neg, ref_neg_mask = ref_flux.encode_prompt(
        prompts, torch.device("cpu"), do_classifier_free_guidance=True, negative_prompt="ugly"
    )
    embeds, mask = ours_flux.encode_prompts(["ugly"] * 3 + prompts)
    length = mask.shape[1]
    assert length < 256 and mask.sum().item() == ref_mask.sum().item() + ref_neg_mask.sum().item()
    expected_mask = torch.cat([ref_neg_mask, ref_mask])[:, -length:]  # left padding: real tokens at the end
    assert torch.equal(mask, expected_mask)
    expected = torch.cat([ref_neg, ref_embeds])[:, -length:]
    assert max_rel_err(embeds[mask], expected[expected_mask]) <= 2e-5


def test_skip_text_cleaning_is_the_references_light_cleaning(ref_flux, ours_flux):
    """skip_text_cleaning=True tokenises the prompts after ftfy and HTML unescaping only, as diffusers does: in
    encode_prompts and through a whole call."""
    prompts = ["A <b>Photo</b> of HTTPS://example.com &amp;amp; a CAT", "  IMG_1234.JPG, ***SALE*** @shop  "]
    ref_embeds, ref_mask, _, _ = ref_flux.encode_prompt(
        prompts, torch.device("cpu"), do_classifier_free_guidance=False, skip_text_cleaning=True
    )
    embeds, mask = ours_flux.encode_prompts(prompts, skip_text_cleaning=True)
    assert mask.sum().item() == ref_mask.sum().item() > ours_flux.encode_prompts(prompts)[1].sum().item()
    expected_mask = ref_mask[:, -mask.shape[1] :]  # left padding: real tokens at the end
    assert torch.equal(mask, expected_mask)
    assert max_rel_err(embeds[mask], ref_embeds[:, -mask.shape[1] :][expected_mask]) <= 2e-5
    kwargs = dict(guidance_scale=4.0, negative_prompt="&lt;Ugly&gt;", output_type="latent")
    expected = reference(ref_flux, prompts[0], skip_text_cleaning=True, **kwargs)
    latents = ours(ours_flux, prompts[0], skip_text_cleaning=True, **kwargs)
    assert max_rel_err(latents, expected) <= LATENT_TOL
    assert max_rel_err(ours(ours_flux, prompts[0], **kwargs), expected) > 10 * LATENT_TOL  # the cleaning shows


def test_output_types(ours_flux):
    pil = ours(ours_flux, PROMPTS[0], guidance_scale=1.0)
    array = ours(ours_flux, PROMPTS[0], guidance_scale=1.0, output_type="np")
    tensor = ours(ours_flux, PROMPTS[0], guidance_scale=1.0, output_type="pt")
    assert isinstance(pil, list) and isinstance(pil[0], Image.Image) and pil[0].size == (256, 256)
    assert isinstance(array, np.ndarray) and array.shape == (1, 256, 256, 3)
    assert np.array_equal(np.asarray(pil[0]), (array[0] * 255).round().astype(np.uint8))
    assert torch.equal(torch.from_numpy(array).permute(0, 3, 1, 2), tensor)
    assert 0 <= tensor.min() and tensor.max() <= 1


def test_seed_latents_and_generator_agree(ours_flux):
    by_seed = ours(ours_flux, PROMPTS[0], seed=5, guidance_scale=1.0, output_type="latent")
    noise = torch.randn((1, 16, 32, 32), generator=torch.Generator("cpu").manual_seed(5))
    by_latents = ours(ours_flux, PROMPTS[0], seed=None, latents=noise, guidance_scale=1.0, output_type="latent")
    by_generator = ours_flux(
        PROMPTS[0], generator=torch.Generator("cpu").manual_seed(5), num_inference_steps=2, guidance_scale=1.0,
        output_type="latent", progress=False,
    )  # fmt: skip
    assert torch.equal(by_seed, by_latents) and torch.equal(by_seed, by_generator)
    other = ours(ours_flux, PROMPTS[0], seed=6, guidance_scale=1.0, output_type="latent")
    assert not torch.equal(by_seed, other)
    for integer_like in (np.int64(5), torch.tensor(5)):  # numpy and 0-d tensor seeds are ints too
        assert torch.equal(ours(ours_flux, PROMPTS[0], seed=integer_like, guidance_scale=1.0, output_type="latent"), by_seed)


def test_a_list_of_seeds_is_the_references_list_of_generators(ref_flux, ours_flux):
    """seed=[s0, s1, s2] stands in for diffusers' generator=[one CPU generator per image], which mirage refuses."""
    seeds = [3, 7, 11]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    kwargs = dict(num_images_per_prompt=3, guidance_scale=1.0, num_inference_steps=2, output_type="pt")
    expected = ref_flux(PROMPTS[0], generator=generators, **kwargs).images
    images = ours_flux(PROMPTS[0], seed=seeds, progress=False, **kwargs)
    assert images.shape == expected.shape == (3, 3, 256, 256)
    assert (images - expected).abs().max().item() <= IMAGE_TOL
    assert not torch.allclose(images[0], images[1])  # three noises, not one


def test_defaults_come_from_the_checkpoint(ours_flux, monkeypatch):
    """Unset steps and guidance are the checkpoint's: Photoroom's 28 and 5 (not PRXPipeline's 4), or a distilled
    checkpoint's 8 without guidance, which makes no unconditional pass."""
    guidance, rows, denoise = [], [], pipeline.denoise
    monkeypatch.setattr(pipeline, "denoise", lambda *args, **kw: guidance.append(args[4]) or denoise(*args, **kw))
    steps = []
    ours_flux(PROMPTS[0], seed=0, output_type="latent", progress=False, callback=lambda i, *rest: steps.append(i))
    assert len(steps) == ours_flux.config.sampling.num_inference_steps == 28
    assert guidance == [ours_flux.config.sampling.guidance_scale] == [5.0]

    distilled = dataclasses.replace(ours_flux.config.sampling, num_inference_steps=8, guidance_scale=1.0)
    monkeypatch.setattr(ours_flux, "config", dataclasses.replace(ours_flux.config, sampling=distilled))
    forward = ours_flux.transformer.forward_modulated
    record = lambda x, *args, **kw: rows.append(len(x)) or forward(x, *args, **kw)  # noqa: E731
    monkeypatch.setattr(ours_flux.transformer, "forward_modulated", record)
    steps.clear()
    guidance.clear()
    ours_flux(PROMPTS[0], seed=0, output_type="latent", progress=False, callback=lambda i, *rest: steps.append(i))
    assert (len(steps), guidance, rows) == (8, [1.0], [1] * 8)


def test_the_default_dtype_is_bf16_on_gpus_and_fp32_on_the_cpu(ours_flux):
    """bf16 is what Photoroom recommends; on CPUs it is fast only with AMX, so fp32 there."""
    for device, dtype in [("cuda", torch.bfloat16), ("cuda:1", torch.bfloat16), ("mps", torch.bfloat16),
                          ("cpu", torch.float32)]:
        assert pipeline.default_dtype(torch.device(device)) == dtype, device
    assert ours_flux.dtype == torch.float32  # opened on the CPU without a dtype


def test_precomputed_embeddings_equal_the_prompt_path(ours_flux):
    embeds, mask = ours_flux.encode_prompts(["", PROMPTS[0]])
    by_embeds = ours_flux(
        prompt_embeds=embeds[1:], prompt_mask=mask[1:], negative_prompt_embeds=embeds[:1], negative_prompt_mask=mask[:1],
        num_inference_steps=2, seed=0, output_type="latent", progress=False,
    )  # fmt: skip
    by_prompt = ours(ours_flux, PROMPTS[0], output_type="latent")
    assert torch.equal(by_embeds, by_prompt)
    for cut in (mask[1:, :1], torch.cat([mask[1:], mask[1:]], dim=1)):  # a mask shorter or longer than its embeddings
        with pytest.raises(ValueError, match=r"a text mask of shape .*: a mask is \[B, L\] for embeddings \[B, L, D\]"):
            ours_flux(prompt_embeds=embeds[1:], prompt_mask=cut, negative_prompt_embeds=embeds[:1], progress=False)
    with pytest.raises(ValueError, match="got 2 negative prompt embeddings for 1 prompts"):
        ours_flux(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds, progress=False)


def test_given_embeddings_and_masks_may_live_on_any_device(mirage_flux, monkeypatch):
    # A negative prompt's embeddings from encode_prompts (on the GPU) beside a prompt's made on the CPU without a
    # mask: each is moved to the pipeline's device before they are joined. The meta device stands in for a GPU
    # (it holds no values, so given tensors cannot be checked for inf/NaN there).
    monkeypatch.setattr(pipeline, "check_given", lambda tensor, name: None)
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu")
    pipe.device = meta = torch.device("meta")
    width = pipe.config.transformer.context_in_dim
    prompt, negative = torch.zeros(1, 5, width), torch.zeros(1, 3, width, device=meta)
    embeds, masks = pipe.text_conditioning(
        None, [""], num_images_per_prompt=2, guidance=True, prompt_embeds=prompt, negative_prompt_embeds=negative,
        negative_prompt_mask=torch.ones(1, 3, device=meta),
    )  # fmt: skip
    assert embeds.device == masks.device == meta and embeds.shape == (4, 5, width) and masks.dtype == torch.bool


def test_the_checkpoints_num_train_timesteps_reaches_the_loop(ours_flux, monkeypatch):
    import mirage.pipeline

    calls, denoise = [], mirage.pipeline.denoise
    monkeypatch.setattr(mirage.pipeline, "denoise", lambda *args, **kwargs: calls.append(kwargs) or denoise(*args, **kwargs))
    ours(ours_flux, PROMPTS[0], output_type="latent")
    assert [c["num_train_timesteps"] for c in calls] == [ours_flux.config.sampling.num_train_timesteps]


def test_custom_sigmas_set_the_schedule(ref_flux, ours_flux):
    """Custom sigmas are shifted like the scheduler's own (the checkpoint's shift is 2.5)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(ref_flux.scheduler.config)
    scheduler.set_timesteps(sigmas=[1.0, 0.6, 0.2])
    seen = []
    ours_flux(PROMPTS[0], sigmas=[1.0, 0.6, 0.2], seed=0, output_type="latent", progress=False,
              callback=lambda i, sigma, *rest: seen.append(float(sigma)))  # fmt: skip
    assert seen == pytest.approx(scheduler.sigmas[:-1].tolist(), abs=1e-7) and seen[1] > 0.75


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(guidance_scale=0.5), "guidance_scale"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a number >= 1"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a number >= 1"),
        (dict(seed=-1), r"seeds must be in \[0, 2\*\*64\), got -1"),
        (dict(seed=[0, 2**64], num_images_per_prompt=2), r"seeds must be in \[0, 2\*\*64\), got 18446744073709551616"),
        (dict(height=20_000), "height and width must be 1 to 16384 pixels, got 20000x256"),
        (dict(seed=5.0), "seeds must be integers, got 5.0"),
        (dict(seed=1, generator=torch.Generator()), "pass one of seed, generator and latents, not seed and generator"),
        (dict(generator=torch.Generator(), latents=torch.zeros(1, 16, 32, 32)), "not generator and latents:"),
        (dict(generator=[torch.Generator()]), "generator must be one torch.Generator, not a list: for one per image"),
        (dict(prompt=[]), "prompt must be a string or a non-empty list of strings"),
        (dict(prompt=["a", None]), "prompt must be a string or a non-empty list of strings"),
        (dict(negative_prompt=[None]), "negative_prompt must be a string or a list of strings"),
        (dict(height=248, width=256, use_resolution_binning=False), "multiples of 16"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(negative_prompt=["a", "b"]), "negative prompts"),
        (dict(num_inference_steps=2.0), "num_inference_steps must be an integer >= 1, got 2.0"),
        (dict(num_images_per_prompt=1.5), "num_images_per_prompt must be an integer >= 1, got 1.5"),
        (dict(guidance_scale="3"), "guidance_scale must be a number >= 1 .*got '3'"),
        (dict(height=64.0), "height and width must be integers, got 64.0 and 256"),
        (dict(sigmas=[float("nan"), 0.5]), r"sigmas must be a list of noise levels in \[0, 1\], got \[nan, 0.5\]"),
        (dict(sigmas=[1.0, -0.5]), r"sigmas must be a list of noise levels in \[0, 1\]"),  # -1 / (shift - 1): 1 / 0
        (dict(sigmas="0.5"), r"sigmas must be a list of noise levels in \[0, 1\], got '0.5'"),
        (dict(sigmas=[]), r"sigmas must be a list of noise levels"),
        (dict(sigmas=[1.0, 0.5, 0.2], num_inference_steps=5), "got 3 sigmas and num_inference_steps=5: pass one of"),
    ],
)
def test_bad_requests_fail_early_with_a_clear_message(ours_flux, kwargs, message, monkeypatch):
    monkeypatch.setattr(ours_flux, "text_conditioning", None)  # nothing may run before the request is refused
    with pytest.raises(ValueError, match=message):
        ours_flux(**{"prompt": "a cat", **kwargs}, progress=False)
    with pytest.raises(ValueError, match="use_resolution_binning=False"):
        nearest_bin(100, 100, 384)


def test_sides_up_to_the_largest_are_allowed():
    """16384 px, the largest side a request may have, is allowed itself, binned or not, as is 1 px."""
    pipeline.check_size(pipeline.MAX_SIDE, 1, multiple=1, binning=True)
    pipeline.check_size(pipeline.MAX_SIDE, pipeline.MAX_SIDE, multiple=16, binning=False)
    with pytest.raises(ValueError, match="1 to 16384 pixels, got 16385x1"):
        pipeline.check_size(pipeline.MAX_SIDE + 1, 1, multiple=1, binning=True)


def test_resize_and_crop_matches_reference_image_processor():
    from diffusers.image_processor import PixArtImageProcessor

    images = torch.rand(2, 3, 192, 320, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for height, width in [(200, 300), (192, 320), (333, 517), (100, 400)]:
        expected = PixArtImageProcessor.resize_and_crop_tensor(images, width, height)
        assert torch.equal(resize_and_crop(images, height, width), expected)


def test_resize_and_crop_is_never_a_pixel_short(ours_flux):
    """768x1344 scaled to cover 500x900 truncates to 514x899: the reference then crops from -1 and keeps one column."""
    from diffusers.image_processor import PixArtImageProcessor

    images = torch.rand(1, 3, 768, 1344, generator=torch.Generator().manual_seed(0))
    assert PixArtImageProcessor.resize_and_crop_tensor(images, 900, 500).shape == (1, 3, 500, 1)  # the reference bug
    assert resize_and_crop(images, 500, 900).shape == (1, 3, 500, 900)
    assert ours(ours_flux, PROMPTS[0], height=64, width=185, guidance_scale=1.0)[0].size == (185, 64)


def test_devices_this_torch_cannot_use_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="device 'meta' is not one mirage runs on: use cuda, mps or cpu"):
        check_device(torch.device("meta"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="this torch build sees no cuda device: use cpu"):
        check_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device(torch.device("cuda:0"))
    with pytest.raises(ValueError, match="there is no cuda:1: this machine has 1 CUDA device"):
        check_device(torch.device("cuda:1"))


@pytest.mark.parametrize(
    "dtype, advice",
    [
        (torch.float16, "in float16: run it in bf16 or fp32 \\(--dtype\\), or check the weights \\(convert the "
                        "checkpoint again\\)$"),
        (torch.bfloat16, "in bfloat16: run it in fp32 \\(--dtype fp32\\), or check the weights"),
        (torch.float32, "in float32: check the weights \\(convert the checkpoint again\\)$"),
    ],
)  # fmt: skip
def test_inf_or_nan_names_the_model_and_what_to_try(dtype, advice):
    check_finite(torch.ones(3, dtype=dtype), "the VAE's images")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match="^the VAE's images hold inf/NaN " + advice):
            check_finite(torch.tensor([0.0, bad], dtype=dtype), "the VAE's images")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_embeds=torch.zeros(0, 4, 32)), r"prompt_embeds must be \[B >= 1, L, 32\], got \(0, 4, 32\)"),
        (dict(prompt_embeds=torch.zeros(4, 32)), r"prompt_embeds must be \[B >= 1, L, 32\], got \(4, 32\)"),
        (dict(prompt_embeds=torch.zeros(1, 4, 32), negative_prompt_embeds=torch.zeros(1, 4, 33)),
         r"negative_prompt_embeds must be \[B >= 1, L, 32\], got \(1, 4, 33\)"),
        # text as prompts and as embeddings at once: one of the two would go unused
        (dict(prompt="a cat", negative_prompt_embeds=torch.zeros(1, 4, 32), negative_prompt_mask=torch.ones(1, 4)),
         "^negative_prompt_embeds and negative_prompt_mask go with prompt_embeds: with prompt, pass negative_prompt$"),
        (dict(prompt="a cat", prompt_mask=torch.ones(1, 4)), "^prompt_mask goes with prompt_embeds"),
        (dict(prompt_embeds=torch.zeros(1, 4, 32), negative_prompt=["blurry"],
              negative_prompt_embeds=torch.zeros(1, 4, 32)),
         "^negative_prompt goes with prompt: with prompt_embeds, pass negative_prompt_embeds$"),
    ],
)  # fmt: skip
def test_given_embeddings_of_the_wrong_shape_or_beside_prompts_are_refused_first(
    ours_flux, kwargs, message, monkeypatch
):
    assert ours_flux.config.transformer.context_in_dim == 32
    monkeypatch.setattr(ours_flux, "text_conditioning", None)
    with pytest.raises(ValueError, match=message):
        ours_flux(**kwargs, guidance_scale=4.0, progress=False)


def test_no_negative_prompt_is_the_empty_one(ours_flux):
    kwargs = dict(num_inference_steps=1, height=64, width=64, use_resolution_binning=False, output_type="latent",
                  seed=0, progress=False)  # fmt: skip
    assert torch.equal(ours_flux("a cat", negative_prompt=None, **kwargs), ours_flux("a cat", **kwargs))


def test_inf_or_nan_in_given_inputs_is_blamed_on_them(ours_flux):
    kwargs = dict(num_inference_steps=1, height=64, width=64, use_resolution_binning=False, progress=False)
    noise = torch.zeros(1, 16, 8, 8)
    noise[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^the given latents hold inf/NaN: pass finite values$"):
        ours_flux("a cat", latents=noise, **kwargs)
    embeds = torch.zeros(1, 4, ours_flux.config.transformer.context_in_dim)
    embeds[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="^the given prompt_embeds hold inf/NaN"):
        ours_flux(prompt_embeds=embeds, guidance_scale=1.0, **kwargs)
    with pytest.raises(ValueError, match="^the given negative_prompt_embeds hold inf/NaN"):
        ours_flux(prompt_embeds=embeds.nan_to_num(), negative_prompt_embeds=embeds, **kwargs)


def test_embeddings_beyond_float16_are_caught_where_they_are_cast(mirage_flux, monkeypatch):
    """The text encoder never runs in fp16: its output can exceed fp16's range only when cast for the transformer."""
    monkeypatch.setattr(precision, "native_fp16", lambda device: True)  # an fp16 transformer, as on a GPU
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", dtype="fp16")
    assert pipe.dtype == torch.float16
    embeds = torch.full((1, 4, pipe.config.transformer.context_in_dim), 1e5)  # finite in fp32, inf in fp16
    with pytest.raises(FloatingPointError, match="^the text embeddings, cast to the transformer's dtype, hold inf/NaN "
                                                 "in float16: run it in bf16 or fp32"):
        pipe(prompt_embeds=embeds, guidance_scale=1.0, num_inference_steps=1, height=64, width=64, progress=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "fp64", "float16"])
def test_only_the_three_dtypes_are_taken(mirage_flux, dtype):
    expected = f"^dtype must be one of fp32, bf16, fp16 or their torch dtypes, got {re.escape(repr(dtype))}$"
    with pytest.raises(ValueError, match=expected):
        MiragePipeline.from_pretrained(mirage_flux, device="cpu", dtype=dtype)
    assert MiragePipeline.from_pretrained(mirage_flux, device="cpu", dtype="fp32").dtype == torch.float32


def test_cpu_0_is_the_cpu(mirage_flux, monkeypatch):
    """safetensors takes "cpu", not "cpu:0" (nor "mps:0" before 0.8): the weights load whatever the spelling."""
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu:0")
    assert pipe.device == torch.device("cpu") and pipe.transformer.txt_in.weight.device.type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    assert MiragePipeline.from_pretrained(mirage_flux, device="mps:0").device == torch.device("mps")


def test_an_apple_gpu_torch_cannot_use_is_explained(mirage_flux, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # an Intel Mac, or macOS 13 with torch 2.9
    with pytest.raises(ValueError, match="torch sees no usable mps device \\(it needs Apple silicon, and macOS 14"):
        MiragePipeline.from_pretrained(mirage_flux, device="mps")


def test_offload_on_the_cpu_says_it_does_nothing(mirage_flux, caplog):
    with caplog.at_level(logging.WARNING, logger="mirage"):
        MiragePipeline.from_pretrained(mirage_flux, device="cpu", offload="model")
    assert "offload='model' saves no memory on the CPU: the models are in CPU memory already" in caplog.messages


def test_nan_weights_stop_the_pipeline_naming_the_model(mirage_flux, tmp_path):
    folder = shutil.copytree(mirage_flux, tmp_path / "nan-vae")
    vae = load_file(folder / "vae.safetensors")
    save_file({k: torch.full_like(v, float("nan")) if k.startswith("decoder.conv_out") else v for k, v in vae.items()},
              folder / "vae.safetensors")  # fmt: skip
    pipe = MiragePipeline.from_pretrained(folder, device="cpu")
    with pytest.raises(FloatingPointError, match="the VAE's images hold inf/NaN in float32: check the weights"):
        pipe("a cat", num_inference_steps=1, height=64, width=64, use_resolution_binning=False, progress=False)


@pytest.mark.parametrize(
    "model, message",
    [
        (b"not a model", "tokenizer.model: not a SentencePiece model .*: use the model's own tokenizer$"),
        (b"", r"tokenizer.model: not a SentencePiece model \(it holds no pieces\): use the model's own tokenizer$"),
        ("other", "tokenizer.model has 800 pieces, but the text encoder embeds only 100: the tokenizer belongs"),
    ],
)
def test_a_tokenizer_that_does_not_fit_is_refused_on_opening(mirage_flux, tmp_path, model, message):
    folder = shutil.copytree(mirage_flux, tmp_path / "checkpoint")
    if isinstance(model, bytes):
        (folder / "tokenizer.model").write_bytes(model)
    else:  # a text encoder config with fewer ids than the tokenizer makes
        config = json.loads((folder / "config.json").read_text())
        config["text_encoder"]["vocab_size"] = 100
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        MiragePipeline.from_pretrained(folder, device="cpu")


def test_a_weights_file_of_another_checkpoint_is_refused_on_opening(mirage_flux, mirage_dcae, tmp_path):
    """Checked from the files' headers when the folder is opened: not after a whole generation, at the decode."""
    folder = shutil.copytree(mirage_flux, tmp_path / "checkpoint")
    shutil.copy(mirage_dcae / "vae.safetensors", folder / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"vae.safetensors does not fit the FluxVAE config: missing keys: .*: "
                                              "convert the checkpoint again$"):  # fmt: skip
        MiragePipeline.from_pretrained(folder, device="cpu")


@pytest.mark.parametrize(
    "part, key, value, message",
    [
        ("transformer", "hidden_size", 64.0, "hidden_size must be int, got 64.0"),
        ("transformer", "theta", "x", "theta must be int, got 'x'"),
        ("transformer", "time_max_period", 0, "theta, time_factor and time_max_period must be positive"),
        ("transformer", "resolution_embeds", 1, "resolution_embeds must be bool, got 1"),
        ("text_encoder", "rope_theta", float("nan"), "rope_theta must be a finite float, got nan"),
        ("text_encoder", "layer_types", ["sliding_attention", 2], r"layer_types must be tuple\[str, ...\]"),
        ("tokenizer", "bos_token", 5, "bos_token must be str, got 5"),
        ("vae", "latent_channels", 16.0, "latent_channels must be int, got 16.0"),
        ("sampling", "shift", "3", "shift must be a finite float, got '3'"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_refused_on_opening(mirage_flux, tmp_path, part, key, value, message):
    folder = shutil.copytree(mirage_flux, tmp_path / "checkpoint")
    config = json.loads((folder / "config.json").read_text())
    config[part][key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config.json is not a valid mirage config \({message}.*\): convert"):
        MiragePipeline.from_pretrained(folder, device="cpu")


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", r"missing does not exist: run python convert_weights.py SRC .*missing to make it$"),
        ("checkpoint/config.json", r"config.json is a file: pass the checkpoint folder \(the one that holds config"),
        ("empty", r"empty is not a converted checkpoint \(no config.json\)"),
        ("truncated", r"vae.safetensors is not a readable safetensors file \(.*\): convert the checkpoint again$"),
        ("prx", r"prx is a diffusers pipeline, not a converted checkpoint: run python convert_weights.py .*prx OUT$"),
        ("prx/transformer", r"transformer is one model of a diffusers pipeline, not a converted checkpoint: run"),
        ("prx/text_encoder", r"text_encoder is one model of a diffusers pipeline, not a converted checkpoint: run"),
    ],
)
def test_a_weights_path_that_is_no_checkpoint_says_what_it_is_and_what_to_do(
    mirage_flux, prx_flux, tmp_path, name, message
):
    shutil.copytree(prx_flux, tmp_path / "prx")
    shutil.copytree(mirage_flux, tmp_path / "checkpoint")
    (tmp_path / "empty").mkdir()
    vae = shutil.copytree(mirage_flux, tmp_path / "truncated") / "vae.safetensors"
    vae.write_bytes(vae.read_bytes()[: vae.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=message):
        MiragePipeline.from_pretrained(tmp_path / name, device="cpu").vae  # .vae reads its weights
