"""Lazy loading, freeing the text encoder, offload modes and compiled blocks change no output; converting
reads hold one copy of the weights."""

import functools
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

import mirage.loading
from mirage import memory, pipeline, precision
from mirage.loading import CheckpointError, loaded_bytes, read_safetensors
from mirage.pipeline import MiragePipeline
from mirage.sampling import denoise, flow_match_sigmas

PROMPT = "a lighthouse on a cliff at dawn"


def generate(pipe, output_type="latent", prompt=PROMPT, **kwargs):
    return pipe(prompt, seed=1, num_inference_steps=2, output_type=output_type, progress=False, **kwargs)


@pytest.fixture(scope="module")
def baseline(mirage_flux):
    return generate(MiragePipeline.from_pretrained(mirage_flux, device="cpu", keep_text_encoder=True))


def test_models_load_on_first_use_and_the_text_encoder_can_go(mirage_flux, baseline):
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", keep_text_encoder=False)
    assert pipe.models == {}  # opening a folder reads no weights
    assert torch.equal(generate(pipe), baseline)
    assert sorted(pipe.models) == ["transformer"]  # text encoder freed; the VAE is not needed for latents
    assert torch.equal(generate(pipe), baseline)  # and reloaded when needed again


def test_the_text_encoder_stays_when_memory_is_ample(mirage_flux, monkeypatch):
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 40)
    generate(pipe)
    assert "text_encoder" in pipe.models
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    generate(pipe)
    assert "text_encoder" not in pipe.models


@pytest.mark.parametrize("offload, kept", [("model", True), (None, False)])
def test_offloaded_models_are_judged_by_cpu_memory(mirage_flux, monkeypatch, offload, kept):
    # With offload the models live in CPU memory between calls: a small GPU is no reason to read the text
    # encoder again at every batch. The meta device stands in for a GPU that has no room.
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", offload=offload)
    pipe.device = torch.device("meta")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 50 if device.type == "cpu" else 0)
    pipe.models["text_encoder"] = torch.nn.Module()
    pipe.free_text_encoder()
    assert ("text_encoder" in pipe.models) == kept


@pytest.mark.parametrize("keep", [False, True])
def test_a_text_encoder_that_failed_is_freed_or_kept_as_one_that_ran(mirage_flux, baseline, keep, monkeypatch):
    # Out of memory while encoding: an encoder that is not to stay goes all the same, rather than sitting beside the
    # transformer (a GPU's worth at full size) until a later call happens to encode prompts.
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", keep_text_encoder=keep)
    monkeypatch.setattr(pipe.text_encoder.layers[1], "forward", out_of_memory)  # partway through the encoder
    with pytest.raises(torch.OutOfMemoryError):
        generate(pipe)
    assert ("text_encoder" in pipe.models) == keep
    monkeypatch.undo()
    assert torch.equal(generate(pipe), baseline)


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def ctrl_c_at_step_1(step, *_):
    if step == 1:
        raise KeyboardInterrupt


@pytest.mark.parametrize("offload", [None, "model", "sequential"])
@pytest.mark.parametrize("stop", ["callback", "block", "decode"])
def test_the_call_after_a_stopped_one_equals_a_fresh_pipelines(mirage_flux, offload, stop, monkeypatch):
    """Ctrl-C from a callback, out of memory in a transformer block or in the VAE: the next call makes the images a
    fresh pipeline makes, with no part of a model left away from home and LoRAs free to change again."""
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu")
    fresh = generate(pipe, output_type="pt", num_images_per_prompt=2)
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", offload=offload, keep_text_encoder=True)
    callback = None
    if stop == "callback":
        callback = ctrl_c_at_step_1
    else:
        part = pipe.transformer.blocks[1] if stop == "block" else pipe.vae.decoder
        monkeypatch.setattr(part, "forward", out_of_memory)
    with pytest.raises(KeyboardInterrupt if stop == "callback" else torch.OutOfMemoryError):
        generate(pipe, output_type="pt", num_images_per_prompt=2, callback=callback)
    monkeypatch.undo()
    assert not pipe.denoising
    parts = [module for model in pipe.models.values() for module in model.modules()]
    assert not any(getattr(module, "streamed_home", None) for module in parts)  # every lent tensor back
    assert torch.equal(generate(pipe, output_type="pt", num_images_per_prompt=2), fresh)


@pytest.fixture
def eager_compile(monkeypatch):
    """`Module.compile` traces and guards as usual but generates no code: what these tests check is the former."""
    monkeypatch.setattr(torch.nn.Module, "compile", functools.partialmethod(torch.nn.Module.compile, backend="eager"))


def test_a_freed_compiled_text_encoder_is_gone_before_the_transformer_is_read(mirage_flux, monkeypatch, eager_compile):
    # A compiled module holds its own compiled call, a reference cycle: without a collection its weights (5 GB
    # at full size) would stay until Python's collector happened to run, the transformer loaded beside them.
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", compile=True, keep_text_encoder=False)
    weight = weakref.ref(next(pipe.text_encoder.layers[0].parameters()))  # the layers are what is compiled
    alive, load = [], pipeline.load_model
    monkeypatch.setattr(pipeline, "load_model", lambda *args: alive.append(weight() is not None) or load(*args))
    generate(pipe)
    assert alive == [False]  # one model read (the transformer), with the text encoder already gone


def test_model_offload_takes_a_model_home_when_moving_it_fails():
    # An out-of-memory error halfway through the move must not leave the moved half on the GPU.
    moves = []

    class Model(torch.nn.Module):
        def to(self, device):
            moves.append(str(device))
            if device != "cpu":
                raise torch.OutOfMemoryError("CUDA out of memory")
            return self

    with pytest.raises(torch.OutOfMemoryError), memory.on_device(Model(), torch.device("meta"), "model"):
        pass
    assert moves == ["meta", "cpu"]


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_modes_give_the_same_latents(mirage_flux, baseline, offload, monkeypatch):
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", offload=offload)
    moved, move = [], torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda model, *to: moved.append(type(model).__name__) or move(model, *to))
    assert torch.equal(generate(pipe), baseline)
    # Model offload moves whole models; block streaming never does (its moves are tested on the meta device next).
    whole = {"T5GemmaEncoder", "MirageTransformer"} & set(moved)
    assert whole == ({"T5GemmaEncoder", "MirageTransformer"} if offload == "model" else set())


def test_block_streaming_runs_every_weight_on_the_device_and_keeps_the_cpu_copy(mirage_flux, monkeypatch):
    # The meta device stands in for a GPU: the inputs live there, so a weight used while still in CPU memory
    # raises. A generation calls parts of a block outside the block's forward too (the text K/V projection
    # and the modulation), and after each call every part holds its original CPU tensors again. The embedding
    # table is read in CPU memory, which needs the token ids copied off the device, and meta tensors have no
    # values to copy: here it streams like the other parts (its lookup is tested next).
    monkeypatch.setattr("torch.fx.experimental._config.meta_nonzero_assume_all_nonzero", True)  # all tokens real
    monkeypatch.setattr(memory, "look_up_in_place", memory.stream)
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", keep_text_encoder=True)
    text_encoder, transformer, vae = models = [pipe.text_encoder, pipe.transformer, pipe.vae]
    weights = [param for model in models for param in model.parameters()]
    addresses = [param.data_ptr() for param in weights]
    meta = torch.device("meta")
    for model in models:
        memory.stream_parts(model, meta)

    tokens, real = torch.zeros(2, 7, dtype=torch.long, device=meta), torch.ones(2, 7, dtype=torch.bool, device=meta)
    context = transformer.encode_text(text_encoder(tokens, real))
    noise = torch.zeros(1, transformer.config.in_channels, 8, 8, device=meta)
    latents = denoise(transformer, noise, flow_match_sigmas(2), context, 5.0)
    assert vae.decode(latents).device == meta
    now = [param for model in models for param in model.parameters()]
    assert len(now) == len(weights) and all(param is before for param, before in zip(now, weights))
    assert [param.data_ptr() for param in now] == addresses  # the same parameters on the same CPU memory
    assert {param.device for param in now} == {torch.device("cpu")}  # nothing stays on the device


class CtrlC(torch.nn.Module):
    def forward(self, x):
        raise KeyboardInterrupt


def test_a_streamed_call_stopped_midway_still_sends_the_weights_home():
    """Ctrl-C inside a block skips its forward hooks: `on_device` puts its CPU tensors back, so a LoRA fused after
    the interruption lands in the weights the next call copies, not in a stale device copy."""
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 4), CtrlC()))  # one block: a linear, then ^C
    weight, meta = model[0][0].weight, torch.device("meta")
    memory.stream_parts(model, meta)
    with pytest.raises(KeyboardInterrupt), memory.on_device(model, meta, "sequential"):
        model(torch.zeros(1, 4, device=meta))
    assert model[0][0].weight is weight and weight.device == torch.device("cpu")


class TwoLinears(torch.nn.Module):
    """A block whose second linear must be on the device before the first runs: the whole block visits at once."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        assert self.second.weight.device == x.device, "the block's parts came one by one"
        return self.second(self.first(x))


class Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([TwoLinears(), TwoLinears()])
        self.norm = torch.nn.BatchNorm1d(4).eval()  # buffers (running statistics) visit with the weights

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def test_each_block_of_a_list_visits_whole_and_leaves_nothing_behind():
    model, meta = Blocks(), torch.device("meta")
    memory.stream_parts(model, meta)
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    for _ in range(2):
        assert model(torch.zeros(2, 4, device=meta)).device == meta
    assert {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]} == tensors  # the CPU ones
    # a call's restores are dropped once done: none pile up, nor keep a replaced weight (a fused LoRA's) alive
    assert all(not module.streamed_home for module in model.modules() if hasattr(module, "streamed_home"))
    del tensors
    replaced = weakref.ref(model.blocks[0].first.weight)
    model.blocks[0].first.weight = torch.nn.Parameter(torch.zeros(4, 4))
    model(torch.zeros(2, 4, device=meta))
    assert replaced() is None


def mlp_bytes(pipe, **call):
    """What a call's bound counts: the bytes of one block's MLP gate and up outputs, seen in a real call."""
    seen = []
    block = pipe.transformer.blocks[0]
    for projection in (block.gate_proj, block.up_proj):
        projection.register_forward_hook(lambda module, args, out: seen.append(out.numel() * out.element_size()))
    generate(pipe, **call)
    return seen[0] + seen[1]  # the first step's


@pytest.mark.parametrize(
    "guidance_scale, dtype, height, width, binning, generated",
    [(1.0, "fp32", 64, 64, False, "64x64"), (4.0, "fp32", 64, 64, False, "64x64"), (4.0, "bf16", 200, 300, True,
     "192x320")],  # the last generated at the nearest bin
)  # fmt: skip
def test_a_call_larger_than_all_memory_is_refused_before_anything_runs(
    mirage_flux, monkeypatch, guidance_scale, dtype, height, width, binning, generated
):
    # Left to run, it would be killed by the OS with no message. The bound is what one MLP holds, so a call whose
    # MLP fits all of memory exactly runs and one a byte short is refused, before any weight is read.
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # bf16 runs in bf16 on any CPU
    call = dict(height=height, width=width, num_images_per_prompt=3, guidance_scale=guidance_scale,
                use_resolution_binning=binning)  # fmt: skip
    need = mlp_bytes(MiragePipeline.from_pretrained(mirage_flux, device="cpu", dtype=dtype), **call)
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", dtype=dtype)
    monkeypatch.setattr(memory, "total_bytes", lambda device: need - 1)
    with pytest.raises(ValueError) as refused:
        generate(pipe, **call)
    assert str(refused.value) == (
        f"3 images at once, generated at {generated} px (height x width), need at least 0.0 GiB, more than the 0.0 GiB "
        f"this cpu can use: make fewer images per call{'' if binning else ', or smaller ones'} (sample.py: fewer "
        "--num-images, or a smaller --batch-size)"
    )  # smaller requests are binned to the same area
    assert pipe.models == {}
    monkeypatch.setattr(memory, "total_bytes", lambda device: need)
    generate(pipe, **call)


def test_one_image_too_large_is_refused_and_nothing_is_without_a_bound(mirage_flux, monkeypatch):
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu")
    monkeypatch.setattr(memory, "total_bytes", lambda device: 1)
    with pytest.raises(ValueError, match=r"^one image generated at 64x64 px \(height x width\), needs at least 0.0"):
        generate(pipe, height=64, width=64, use_resolution_binning=False)
    monkeypatch.setattr(memory, "total_bytes", lambda device: 0)  # no bound known (macOS, Windows): no check
    generate(pipe, height=64, width=64, num_images_per_prompt=300, use_resolution_binning=False)


def test_memory_is_ample_beyond_twice_the_weights(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 3000)
    cpu = torch.device("cpu")
    assert memory.is_ample(cpu, 1499) and not memory.is_ample(cpu, 1500) and not memory.is_ample(cpu, 2000)


def test_an_embedding_table_is_read_in_cpu_memory():
    table = torch.nn.Embedding(10, 4)
    memory.stream_parts(torch.nn.Sequential(table), torch.device("meta"))
    rows = table(torch.tensor([[3, 1, 4]]))
    assert rows.device == torch.device("meta") and rows.shape == (1, 3, 4)  # only the rows reach the device
    assert table.weight.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU; the meta-device test above covers the rest")
def test_block_streaming_on_cuda_equals_keeping_the_models_there(mirage_flux):
    kept = generate(MiragePipeline.from_pretrained(mirage_flux, "cuda", torch.float32, keep_text_encoder=True))
    streamed = generate(MiragePipeline.from_pretrained(mirage_flux, "cuda", torch.float32, offload="sequential"))
    torch.testing.assert_close(streamed, kept, rtol=1e-5, atol=1e-5)


def test_unknown_offload_mode_is_refused(mirage_flux):
    with pytest.raises(ValueError, match="offload"):
        MiragePipeline.from_pretrained(mirage_flux, device="cpu", offload="disk")


def test_compile_refuses_sequential_offload(mirage_flux):
    # Each part's weight move is a hook that breaks the compiled graph: compiling would only cost time.
    with pytest.raises(ValueError, match="sequential offload's weight moves .* use offload='model'"):
        MiragePipeline.from_pretrained(mirage_flux, device="cpu", offload="sequential", compile=True)


@pytest.mark.parametrize(
    "device, offload, message",
    [("cpu", None, "need a CUDA device, not cpu"), ("cuda", "sequential", "cannot replay sequential offload")],
)
def test_cuda_graph_refuses_what_it_cannot_replay(mirage_flux, device, offload, message, monkeypatch):
    # Refused when the pipeline is made: nothing touches the (absent) GPU before it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=message):
        MiragePipeline.from_pretrained(mirage_flux, device, torch.float32, offload=offload, cuda_graph=True)


@pytest.mark.parametrize("checkpoint", ["mirage_flux", "mirage_dcae"])
def test_compiled_models_equal_eager(checkpoint, request):
    folder = request.getfixturevalue(checkpoint)
    eager = MiragePipeline.from_pretrained(folder, device="cpu", keep_text_encoder=True)
    pipe = MiragePipeline.from_pretrained(folder, device="cpu", compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # other tests compile too
    compiled = generate(pipe, output_type="pt")
    # one graph shared by the transformer blocks, one by the encoder layers, one for the decoder: no graph breaks
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    assert torch.allclose(compiled, generate(eager, output_type="pt"), rtol=1e-4, atol=1e-5)


NEW_SHAPES = {
    "prompt lengths": [dict(prompt=p) for p in ("a fox", "a fox in the snow", "a red fox", "a red fox asleep in the snow")],
    "image sizes": [dict(height=h, width=w) for h, w in ((256, 256), (320, 256), (384, 448), (256, 640))],
}


@pytest.mark.parametrize("changing", NEW_SHAPES)
def test_new_shapes_compile_no_more_after_the_second(mirage_flux, eager_compile, changing):
    # torch.compile specialises on the first shapes it sees and makes those that changed dynamic at the next
    # compile: a third prompt length or image size must reuse that code, not compile again (seconds to minutes).
    pipe = MiragePipeline.from_pretrained(mirage_flux, device="cpu", compile=True, keep_text_encoder=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []
    for call in NEW_SHAPES[changing]:
        generate(pipe, output_type="pt", **call)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2] == graphs[3], graphs


COLD_EAGER_SCRIPT = """
import sys
from mirage.pipeline import MiragePipeline
MiragePipeline.from_pretrained(sys.argv[1], device="cpu")("a fox", seed=0, num_inference_steps=2, progress=False)
print("torch._dynamo" in sys.modules)
"""


def test_a_cold_eager_generation_never_imports_the_compiler(mirage_flux):
    # Importing torch._dynamo took ~2 s of every cold start; eager mode has no use for it. Building the text
    # encoder on the meta device pulled it in, through the embedding table's random initialisation.
    script = subprocess.run(
        [sys.executable, "-c", COLD_EAGER_SCRIPT, str(mirage_flux)], capture_output=True, text=True, check=True
    )
    assert script.stdout.strip() == "False"


def test_converting_read_equals_the_mapped_read(tmp_path):
    """Every stored dtype read into every floating dtype: the values of the memory-mapped read, converted."""
    path = tmp_path / "mixed.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "b.f16": torch.randn(7, generator=g).half(),
        "c.f32": torch.randn(2, 2, 2, generator=g),
        "d.empty": torch.zeros(0, 4),
        "e.int": torch.arange(6).reshape(2, 3),
    }
    save_file(tensors, path, metadata={"format": "pt"})
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        read = read_safetensors(path, dtype=dtype)
        assert read.keys() == tensors.keys()
        assert loaded_bytes(path, dtype) == sum(tensor.nbytes for tensor in read.values())
        for name, tensor in load_file(path).items():
            expected = tensor.to(dtype) if tensor.is_floating_point() else tensor
            assert read[name].dtype == expected.dtype and torch.equal(read[name], expected), name
    path.write_bytes(path.read_bytes()[:-8])  # truncated data
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_safetensors(path, dtype=torch.float32)


def test_a_file_that_cannot_be_mapped_is_blamed_on_memory_not_on_the_file(tmp_path, monkeypatch):
    """safe_open maps the file; where the memory limit refuses that, converting the checkpoint again will not help."""
    path = tmp_path / "a.safetensors"
    save_file({"a": torch.zeros(2)}, path)

    def refused(*args, **kwargs):  # what safe_open raises under `ulimit -v`
        raise RuntimeError(f"unable to mmap 51297432 bytes from file <{path}>: Cannot allocate memory (12)")

    monkeypatch.setattr(mirage.loading, "safe_open", refused)
    with pytest.raises(CheckpointError, match=r"a\.safetensors could not be mapped into memory \(unable to mmap .*\): "
                                              r"free memory and try again$"):
        read_safetensors(path)

    def no_room(*args, **kwargs):  # a GPU without room: torch's own error, not the file's
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(mirage.loading, "safe_open", no_room)
    with pytest.raises(torch.OutOfMemoryError):
        read_safetensors(path)


# The peak RSS of this process image; not ru_maxrss, which a child starts with the RSS of the parent it forked from.
PEAK_SCRIPT = """
import re, sys, torch
from mirage.loading import read_safetensors
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
before = peak()
tensors = read_safetensors(sys.argv[1], dtype=torch.float32)
print(peak() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_converting_read_never_holds_the_file_and_its_conversion(tmp_path):
    """Loading 256 MiB of bf16 weights in fp32 grows peak memory by the 512 MiB of fp32 weights plus one stored tensor
    (16 MiB); a memory-mapped conversion would keep the whole bf16 file resident too (768 MiB)."""
    path = tmp_path / "bf16.safetensors"
    save_file({f"w{i}": torch.ones(2048, 4096, dtype=torch.bfloat16) for i in range(16)}, path)
    script = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    fp32_bytes = 16 * 2048 * 4096 * 4
    assert fp32_bytes <= int(script.stdout) < 1.1 * fp32_bytes


def test_free_memory_figures_per_device_and_os(monkeypatch):
    """Apple GPUs: Metal's budget for the process, less what it holds. CUDA: its free memory, not its total. CPUs:
    free memory where the OS says (Linux), all of it where it says only that (macOS), none where it says nothing
    (Windows: the text encoder is freed)."""
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 12 << 30, raising=False)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 2 << 30)
    assert memory.available_bytes(torch.device("mps")) == 10 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 << 30, 80 << 30))  # (free, total)
    assert memory.available_bytes(torch.device("cuda", 1)) == 3 << 30
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PHYS_PAGES": 4000, "SC_PAGE_SIZE": 4096}

    def sysconf(name):
        if name not in pages:
            raise ValueError(f"unrecognized configuration name {name}")
        return pages[name]

    monkeypatch.setattr(memory.os, "sysconf", sysconf)
    assert memory.available_bytes(torch.device("cpu")) == 1000 * 4096
    del pages["SC_AVPHYS_PAGES"]
    assert memory.available_bytes(torch.device("cpu")) == 4000 * 4096
    monkeypatch.delattr(memory.os, "sysconf")
    assert memory.available_bytes(torch.device("cpu")) == 0 and not memory.is_ample(torch.device("cpu"), 1)


def test_the_most_memory_a_call_could_use_per_device_and_os(monkeypatch, tmp_path):
    """A bound only where one exists: a CUDA GPU's total (Windows' driver may spill into system memory), a Linux
    CPU's memory and swap within a container's cgroup v2 or v1 limits; none on macOS, whose swap grows as needed."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 << 30, 80 << 30))  # (free, total)
    assert memory.total_bytes(torch.device("cuda", 1)) == 80 << 30
    monkeypatch.setattr(memory.os, "name", "nt")
    assert memory.total_bytes(torch.device("cuda", 1)) == 0
    monkeypatch.undo()  # back to this OS's name, which pathlib and pytest's report need
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "meminfo")
    memory.MEMINFO.write_text("MemTotal:       24684084 kB\nMemFree:        22793644 kB\nSwapTotal:       2097148 kB\n")
    monkeypatch.setattr(memory, "CGROUP", tmp_path / "cgroup")  # no cgroup v2 files: the host's sizes
    assert memory.total_bytes(torch.device("cpu")) == (24684084 + 2097148) * 1024
    memory.CGROUP.mkdir()
    (memory.CGROUP / "memory.max").write_text("8589934592\n")  # a container of 8 GiB, with the host's swap
    (memory.CGROUP / "memory.swap.max").write_text("max\n")
    assert memory.total_bytes(torch.device("cpu")) == (8 << 30) + 2097148 * 1024
    (memory.CGROUP / "memory.swap.max").write_text("0\n")
    assert memory.total_bytes(torch.device("cpu")) == 8 << 30
    (memory.CGROUP / "memory.max").write_text("max\n")
    assert memory.total_bytes(torch.device("cpu")) == 24684084 * 1024
    for name in ("memory.max", "memory.swap.max"):
        (memory.CGROUP / name).unlink()
    v1 = memory.CGROUP / "memory"  # cgroup v1: "no limit" is a number near 2**63
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory.total_bytes(torch.device("cpu")) == (24684084 + 2097148) * 1024
    (v1 / "memory.limit_in_bytes").write_text("8589934592\n")  # 8 GiB, and the host's swap (no swap accounting)
    assert memory.total_bytes(torch.device("cpu")) == (8 << 30) + 2097148 * 1024
    (v1 / "memory.memsw.limit_in_bytes").write_text("9663676416\n")  # memory and swap together: 9 GiB
    assert memory.total_bytes(torch.device("cpu")) == 9 << 30
    (v1 / "memory.memsw.limit_in_bytes").write_text("8589934592\n")  # equal to the memory limit: no swap
    total = memory.total_bytes(torch.device("cpu"))
    assert total == 8 << 30 and isinstance(total, int)  # the limits' inf never leaks out
    assert memory.total_bytes(torch.device("mps")) == 0
    memory.MEMINFO.unlink()  # not Linux
    assert memory.total_bytes(torch.device("cpu")) == 0
