"""The sampler against diffusers: the FlowMatchEulerDiscreteScheduler schedule, and the PRXPipeline denoising loop
run end to end on latents with a tiny transformer whose weights are all random."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline

from mirage import sampling
from mirage.sampling import denoise, flow_match_sigmas
from parity import assert_parity
from tests.test_transformer import DCAE_TINY, FLUX_TINY, make_pair


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 28, 50])
def test_sigmas_and_timesteps_equal_the_scheduler(num_steps):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(num_steps)
    sigmas = flow_match_sigmas(num_steps)
    assert sigmas.dtype == torch.float32 and sigmas[-1] == 0
    assert torch.equal(sigmas, scheduler.sigmas)
    assert torch.equal(sigmas[:-1] * 1000, scheduler.timesteps)


def test_low_end_is_shifted_twice_like_the_scheduler():
    assert flow_match_sigmas(28)[-2].item() == pytest.approx(0.0089286, abs=1e-6)  # not shift(1 / 1000) = 0.0030


@pytest.mark.parametrize("shift", [1.0, 2.7, 6.0])
@pytest.mark.parametrize("custom", [None, [1.0, 0.7, 0.33, 0.1], [0.9, 0.5, 0.123456789, 0.001]])
def test_other_shifts_and_custom_sigmas_equal_the_scheduler(shift, custom):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(4, sigmas=custom)
    assert torch.equal(flow_match_sigmas(4, shift, sigmas=custom), scheduler.sigmas)


def test_bad_schedules_raise():
    for bad in (dict(num_steps=0), dict(num_steps=3, sigmas=[1.0, 0.5]), dict(num_steps=2, shift=0.0)):
        with pytest.raises(ValueError):
            flow_match_sigmas(**bad)


def text_inputs(config, batch, seed):
    """Prompt and negative-prompt embeddings, left-padded to different lengths."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, batch, 12, config.context_in_dim, generator=g)
    lengths = torch.tensor([[3, 9], [5, 12]])[:, :batch]  # [negative / prompt, batch]
    masks = torch.arange(12) >= 12 - lengths[..., None]  # [2, B, 12]
    return embeds, masks


def reference_loop(ref, latents, embeds, masks, num_steps, guidance_scale):
    """diffusers' PRXPipeline from latents to latents: no text encoder, no VAE."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = PRXPipeline(transformer=ref, scheduler=scheduler, text_encoder=None, tokenizer=None, vae=None)
    pipe.set_progress_bar_config(disable=True)
    guided = guidance_scale > 1
    return pipe(
        prompt_embeds=embeds[1],
        prompt_attention_mask=masks[1],
        negative_prompt_embeds=embeds[0] if guided else None,
        negative_prompt_attention_mask=masks[0] if guided else None,
        latents=latents,
        height=latents.shape[2] * 8,
        width=latents.shape[3] * 8,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        use_resolution_binning=False,
        output_type="latent",
    ).images


def ours_loop(ours, latents, embeds, masks, num_steps, guidance_scale, **kwargs):
    rows = slice(None) if guidance_scale > 1 else slice(1, None)  # [negative; prompt], or the prompt alone
    context = ours.encode_text(embeds[rows].flatten(0, 1), masks[rows].flatten(0, 1))
    return denoise(ours, latents, flow_match_sigmas(num_steps), context, guidance_scale, **kwargs)


# 14 steps: one of its sigmas moves by an ulp through timestep / 1000, as the reference feeds the model.
@pytest.mark.parametrize("config", [FLUX_TINY, DCAE_TINY], ids=["flux", "dcae"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
@torch.no_grad()
def test_loop_equals_the_reference_pipeline(config, guidance_scale):
    ours, ref = make_pair(config, seed=7)
    p = config.patch_size
    latents = torch.randn(1, config.in_channels, 6 * p, 4 * p, generator=torch.Generator().manual_seed(8))
    embeds, masks = text_inputs(config, batch=1, seed=9)
    rows = []
    ours.forward_modulated = record_rows(ours.forward_modulated, rows)
    out = ours_loop(ours, latents, embeds, masks, 14, guidance_scale)
    assert rows == [2 if guidance_scale > 1 else 1] * 14  # guidance 1: no unconditional pass at all
    assert_parity(out, reference_loop(ref, latents, embeds, masks, 14, guidance_scale))


def record_rows(forward_modulated, rows):
    def wrapped(latents, mod, text):
        rows.append(latents.shape[0])
        return forward_modulated(latents, mod, text)

    return wrapped


@torch.no_grad()
def test_guided_batch_equals_the_reference_image_by_image():
    """diffusers crashes on a guided batch of several images; each row must equal its single-image run."""
    ours, ref = make_pair(FLUX_TINY, seed=10)
    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(11))
    embeds, masks = text_inputs(FLUX_TINY, batch=2, seed=12)
    out = ours_loop(ours, latents, embeds, masks, 6, 3.0)
    for b in range(2):
        expected = reference_loop(ref, latents[b : b + 1], embeds[:, b : b + 1], masks[:, b : b + 1], 6, 3.0)
        assert_parity(out[b : b + 1], expected)


@torch.no_grad()
@pytest.mark.parametrize("num_train_timesteps", [1000, 777])
def test_model_is_fed_the_reference_timestep_over_num_train_timesteps(num_train_timesteps):
    ours, _ = make_pair(FLUX_TINY)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=3.0)
    scheduler.set_timesteps(14)
    expected = scheduler.timesteps / num_train_timesteps
    assert not torch.equal(expected, scheduler.sigmas[:-1])  # the round trip matters for this schedule
    seen = []
    modulate = ours.modulate
    ours.modulate = lambda sigma, h, w: seen.append(sigma) or modulate(sigma, h, w)
    embeds, masks = text_inputs(FLUX_TINY, batch=1, seed=13)
    context = ours.encode_text(embeds.flatten(0, 1), masks.flatten(0, 1))
    sigmas = flow_match_sigmas(14, 3.0, num_train_timesteps)
    denoise(ours, torch.randn(1, 16, 4, 4), sigmas, context, 2.0, num_train_timesteps=num_train_timesteps)
    assert len(seen) == 1 and torch.equal(seen[0], expected)  # every step's modulation computed once, up front


@torch.no_grad()
def test_callback_sees_each_step_before_its_update():
    ours, _ = make_pair(FLUX_TINY)
    embeds, masks = text_inputs(FLUX_TINY, batch=1, seed=14)
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(15))
    calls = []
    out = ours_loop(ours, latents, embeds, masks, 5, 2.0, callback=lambda *args: calls.append(args))
    sigmas = flow_match_sigmas(5)
    assert [i for i, *_ in calls] == list(range(5)) and torch.equal(torch.stack([c[1] for c in calls]), sigmas[:-1])
    assert torch.equal(calls[0][2], latents)
    for i in range(4):
        _, sigma, x, v = calls[i]
        assert torch.equal(calls[i + 1][2], x + (sigmas[i + 1] - sigma) * v)  # the Euler step, in fp32
    _, sigma, x, v = calls[-1]
    assert torch.equal(out, x - sigma * v)  # the last step lands on sigma = 0: x0 = x - sigma * v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_loop_is_finite_and_keeps_the_latent_dtype(dtype):
    ours, _ = make_pair(FLUX_TINY, seed=16)
    embeds, masks = text_inputs(FLUX_TINY, batch=1, seed=17)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(18))
    expected = ours_loop(ours, latents, embeds, masks, 4, 4.0)
    out = ours_loop(ours.to(dtype), latents.to(dtype), embeds.to(dtype), masks, 4, 4.0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_updates_are_computed_in_fp32_and_rounded_once(dtype):
    """x + (sigma_next - sigma) v in fp32, then rounded to the latents' dtype: not (sigma_next - sigma) v rounded
    first, as diffusers' scheduler does when v is half precision (its 0-d sigma tensor does not promote v)."""
    ours, _ = make_pair(FLUX_TINY, seed=16)
    embeds, masks = text_inputs(FLUX_TINY, batch=1, seed=17)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(18)).to(dtype)
    calls = []
    out = ours_loop(ours.to(dtype), latents, embeds.to(dtype), masks, 6, 4.0, callback=lambda *a: calls.append(a[1:]))
    sigmas = flow_match_sigmas(6)
    after = [x for _, x, _ in calls[1:]] + [out]
    rounded_first = 0
    for (sigma, x, v), sigma_next, x_next in zip(calls, sigmas[1:], after):
        assert x_next.dtype == dtype and torch.equal(x_next, (x.float() + (sigma_next - sigma) * v.float()).to(dtype))
        rounded_first += not torch.equal(x_next, (x.float() + (sigma_next - sigma) * v).to(dtype))
    assert rounded_first > 0  # the two orders differ on these latents: the check above can tell them apart


def test_text_rows_must_match_guidance():
    ours, _ = make_pair(FLUX_TINY)
    embeds, masks = text_inputs(FLUX_TINY, batch=1, seed=19)
    context = ours.encode_text(embeds[1], masks[1])  # prompt only
    with pytest.raises(ValueError, match="text rows"):
        denoise(ours, torch.randn(1, 16, 4, 4), flow_match_sigmas(2), context, guidance_scale=3.0)


def graph_on_the_cpu(run, device):
    """`sampling.record` as a CUDA graph behaves, without a GPU: replay() reruns the recorded computation on the
    buffers it read when recorded and writes into the same output tensor."""
    first, out = run(), run()
    return first, lambda: out.copy_(run()), out


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
@torch.no_grad()
def test_step_graph_feeds_each_replay_its_own_step(guidance_scale, monkeypatch):
    """Each replay must see that step's latents and modulation, and hand out a velocity the next one keeps."""
    ours, _ = make_pair(FLUX_TINY, seed=20)
    embeds, masks = text_inputs(FLUX_TINY, batch=2, seed=21)
    latents = torch.randn(2, 16, 8, 4, generator=torch.Generator().manual_seed(22))
    eager, graphed = [], []
    expected = ours_loop(ours, latents, embeds, masks, 5, guidance_scale, callback=lambda *args: eager.append(args))
    monkeypatch.setattr(sampling, "record", graph_on_the_cpu)
    out = ours_loop(
        ours, latents, embeds, masks, 5, guidance_scale, cuda_graph=True, callback=lambda *args: graphed.append(args)
    )
    assert torch.equal(out, expected)
    for (_, _, x, v), (_, _, x_graphed, v_graphed) in zip(eager, graphed, strict=True):
        assert torch.equal(x_graphed, x) and torch.equal(v_graphed, v)


def test_a_step_graph_is_recorded_on_a_stream_of_its_own_device(monkeypatch):
    # torch.cuda.graph's default capture stream is made once, on the first device ever recorded on: a pipeline on
    # a second GPU must record on its own stream. torch.cuda stands in here, recording which stream was used.
    streams, captured = [], []

    class Stream:
        def __init__(self):
            streams.append(self)

        def wait_stream(self, other):
            pass

    for name, fake in {
        "device": lambda device: contextlib.nullcontext(), "stream": lambda stream: contextlib.nullcontext(),
        "Stream": Stream, "current_stream": lambda: SimpleNamespace(wait_stream=lambda other: None),
        "CUDAGraph": lambda: SimpleNamespace(replay=None),
        "graph": lambda graph, stream=None: captured.append(stream) or contextlib.nullcontext(),
    }.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, fake)
    sampling.record(lambda: torch.zeros(1), torch.device("cuda", 1))
    assert captured == streams and len(streams) == 1


def test_a_single_step_records_no_graph(monkeypatch):
    ours, _ = make_pair(FLUX_TINY, seed=27)
    embeds, masks = text_inputs(FLUX_TINY, batch=1, seed=28)
    monkeypatch.setattr(sampling, "record", lambda *args: pytest.fail("recorded a graph it would never replay"))
    latents = torch.randn(1, 16, 4, 4)
    graphed = ours_loop(ours, latents, embeds, masks, 1, 3.0, cuda_graph=True)
    assert torch.equal(graphed, ours_loop(ours, latents, embeds, masks, 1, 3.0))


def test_step_graph_needs_cuda():
    ours, _ = make_pair(FLUX_TINY)
    embeds, masks = text_inputs(FLUX_TINY, batch=1, seed=23)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        ours_loop(ours, torch.randn(1, 16, 4, 4), embeds, masks, 2, 3.0, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; the CPU test above covers the rest")
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
@torch.no_grad()
def test_step_graph_equals_eager_on_cuda(guidance_scale):
    ours, _ = make_pair(FLUX_TINY, seed=24)
    ours = ours.cuda()
    embeds, masks = text_inputs(FLUX_TINY, batch=2, seed=25)
    embeds = embeds.cuda()
    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(26)).cuda()
    expected = ours_loop(ours, latents, embeds, masks, 6, guidance_scale)
    out = ours_loop(ours, latents, embeds, masks, 6, guidance_scale, cuda_graph=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
