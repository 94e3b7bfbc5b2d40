"""Flow-matching Euler sampling with classifier-free guidance, as diffusers' PRXPipeline runs it.

Convention (rectified flow): x_sigma = (1 - sigma) * x0 + sigma * eps, sigma going from 1 (noise) to 0 (data);
the transformer predicts the velocity v = eps - x0, so one Euler step is x <- x + (sigma_next - sigma) * v.

Follows `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)` and the denoising loop of
`PRXPipeline.__call__` (diffusers 0.42). Deviates by being two free functions instead of a stateful scheduler,
by guiding batches of any size (the reference crashes beyond one image), by computing every step's adaLN
modulation before the loop, by doing the whole Euler update in fp32 (the reference rounds
(sigma_next - sigma) * v to the model dtype before adding it), and by optionally replaying the model call of
each step as a CUDA graph (`StepGraph`).

Shapes: B images (the sampler's batch), C latent channels, h/w latent height/width.
"""

from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from mirage.transformer import MirageTransformer, Modulation, TextContext

NUM_TRAIN_TIMESTEPS = 1000


def _shift(sigma, shift: float):
    """Move noise levels towards 1, spending more steps at high noise (sigma 0 and 1 stay put)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_match_sigmas(
    num_steps: int,
    shift: float = 3.0,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    sigmas: list[float] | None = None,
) -> Tensor:
    """The noise levels [num_steps + 1] (fp32, CPU) of the reference scheduler, ending with a terminal 0.

    `sigmas` (num_steps values, highest first) replaces the default linear ramp and is shifted like it.
    """
    if num_steps < 1 or shift <= 0:
        raise ValueError(f"need num_steps >= 1 and shift > 0, got {num_steps} and {shift}")
    if sigmas is None:
        # The reference scheduler keeps the ends of its already shifted training table, shift(T / T) and
        # shift(1 / T) in fp32, spaces the steps linearly between them and then shifts them ALL again. The top
        # end is a fixed point (shift(1) = 1) but the low end is shifted twice: with two steps or more, the last
        # sigma is 0.0089, not 0.0030 (one step has only the top). The published models were tuned with this
        # schedule, so it is reproduced exactly, float64 numpy arithmetic included.
        sigma_max, sigma_min = _shift(torch.tensor([num_train_timesteps, 1.0]) / num_train_timesteps, shift).tolist()
        ramp = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
        ramp = ramp / num_train_timesteps
    else:
        ramp = np.array(sigmas, dtype=np.float32)
        if ramp.shape != (num_steps,):
            raise ValueError(f"expected {num_steps} custom sigmas, got shape {ramp.shape}")
    return torch.cat([torch.from_numpy(_shift(ramp, shift)).float(), torch.zeros(1)])


@torch.no_grad()
def denoise(
    model: MirageTransformer,
    latents: Tensor,
    sigmas: Tensor,
    text: TextContext,
    guidance_scale: float = 1.0,
    callback: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
    progress: bool = False,
    cuda_graph: bool = False,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> Tensor:
    """Integrate latents [B, C, h, w] at noise level sigmas[0] down to sigmas[-1]; returns them in their dtype.

    text: the context of the 2B rows [uncond; cond] when guidance_scale > 1, else of the B prompts.
    callback(i, sigma, x, v) runs before each update, with the latents x at sigma and the guided velocity v
    (so x0 = x - sigma * v). cuda_graph: record the model call of the first step and replay it (CUDA only).
    """
    guided = guidance_scale > 1  # at 1 the guided velocity is the conditional one: skip the unconditional pass
    if text.batch_size != latents.shape[0] * (2 if guided else 1):
        raise ValueError(f"{text.batch_size} text rows for {latents.shape[0]} latents with guidance {guidance_scale}")
    # The reference feeds the model timestep / T where timestep = sigma * T in fp32 (T: the scheduler's
    # num_train_timesteps); that round trip moves ~3 % of sigmas by one ulp, which the x1000 time embedding
    # amplifies, so take the same path.
    model_sigmas = (sigmas[:-1] * num_train_timesteps / num_train_timesteps).to(latents.device)
    # The adaLN vectors depend only on sigma: compute every step's at once, one row broadcast over the batch.
    mods = model.modulate(model_sigmas, *latents.shape[-2:])
    replays = cuda_graph and len(sigmas) > 2  # a single step would record a graph and never replay it
    step = StepGraph(model, text) if replays else partial(model.forward_modulated, text=text)
    for i in tqdm(range(len(sigmas) - 1), disable=not progress):
        v = step(torch.cat([latents, latents]) if guided else latents, mods.step(i))  # [2B or B, C, h, w]
        if guided:
            v_uncond, v_cond = v.chunk(2)  # [B, C, h, w] each
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        if callback is not None:
            callback(i, sigmas[i], latents, v)
        latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(latents.dtype)
    return latents


class StepGraph:
    """The model call of a denoising step, recorded as a CUDA graph at the first step and replayed at the others.

    A step launches hundreds of small kernels (norms, RoPE, gates, attention between the matrix products); at
    512 px on a fast GPU many of them finish sooner than Python can launch the next, leaving the GPU idle
    between them. A graph launches all of them at once. It reads its inputs from, and writes its output to,
    the buffers it was recorded with, so each call copies the latents and that step's modulation into them;
    everything else a step reads (weights, text context, RoPE table) stays put for the whole generation.
    Recorded once per generation, so a new size, prompt or LoRA scale is simply a new recording.
    """

    def __init__(self, model: MirageTransformer, text: TextContext):
        self.model, self.text = model, text
        self.x = self.mod = self.v = self.replay = None  # the recorded input and output buffers, and the graph

    def __call__(self, x: Tensor, mod: Modulation) -> Tensor:
        """The velocity of latents x [B, C, h, w] at the noise level of mod, as `forward_modulated` gives it."""
        if self.replay is None:
            self.x, self.mod = x.clone(), Modulation(mod.blocks.clone(), mod.final.clone())
            v, self.replay, self.v = record(self.run, x.device)
            return v
        self.x.copy_(x)
        self.mod.blocks.copy_(mod.blocks)
        self.mod.final.copy_(mod.final)
        self.replay()
        return self.v.clone()  # the next replay overwrites self.v; a caller may keep this one

    def run(self) -> Tensor:
        return self.model.forward_modulated(self.x, self.mod, self.text)


def record(run: Callable[[], Tensor], device: torch.device) -> tuple[Tensor, Callable[[], None], Tensor]:
    """Call run() once, then record the kernels of a second call as a CUDA graph.

    -> (the first call's output, replay, out): replay() reruns the recorded kernels on the buffers they read
    when recorded and writes into out. The first call runs on a side stream, as recording needs: it sets up
    the lazily created state (library handles, workspaces, compiled kernels) that must not be created while
    recording, and its output is a real step.
    """
    require_cuda(device)
    with torch.cuda.device(device):  # recording and its streams belong to the current device
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            first = run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):  # by default, one stream made on the first device ever recorded on
            out = run()
    return first, graph.replay, out


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device}: drop the CUDA graph option")
