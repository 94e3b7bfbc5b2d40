"""convert_weights.py on every source format it reads, and on bad input."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file, save_file
from transformers import GemmaTokenizerFast
from transformers.models.t5gemma.configuration_t5gemma import T5GemmaConfig
from transformers.models.t5gemma.modeling_t5gemma import T5GemmaForConditionalGeneration

import convert_weights
import mirage
from mirage.configs import FluxVAEConfig, MirageConfig, TransformerConfig
from mirage.loading import CheckpointError, rename_original_key
from mirage.tokenizer import GemmaTokenizer
from mirage.vae_flux import FluxVAE

ROOT = Path(__file__).resolve().parents[1]


def convert(*args):
    convert_weights.main([str(a) for a in args])


def converted(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(folder / f"{name}.safetensors")


def config_of(folder: Path) -> MirageConfig:
    return MirageConfig.from_dict(json.loads((folder / "config.json").read_text()))


def assert_same_tensors(ours: dict, source: dict):
    assert sorted(ours) == sorted(source)
    for key, value in source.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


@pytest.mark.parametrize("vae", ["flux", "dcae"])
def test_diffusers_layout_converts_every_tensor_unchanged(request, vae):
    src, out = request.getfixturevalue(f"prx_{vae}"), request.getfixturevalue(f"mirage_{vae}")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "text_encoder.safetensors", "tokenizer.model", "transformer.safetensors", "vae.safetensors"
    ]  # fmt: skip
    assert_same_tensors(converted(out, "transformer"), load_file(src / "transformer/diffusion_pytorch_model.safetensors"))
    assert_same_tensors(converted(out, "text_encoder"), load_file(src / "text_encoder/model.safetensors"))
    assert_same_tensors(converted(out, "vae"), load_file(src / "vae/diffusion_pytorch_model.safetensors"))
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer/tokenizer.model").read_bytes()
    config = config_of(out)
    transformer = json.loads((src / "transformer/config.json").read_text())
    assert config.vae_type == {"flux": "flux", "dcae": "dc-ae"}[vae]
    assert config.transformer == TransformerConfig.from_diffusers(transformer)
    assert (config.sampling.shift, config.sampling.default_sample_size) == (2.5, 256)  # read, not defaulted
    assert (config.sampling.num_inference_steps, config.sampling.guidance_scale) == (28, 5.0)  # Photoroom's cfg


# Photoroom's training codebase names, per REFERENCE.md (the RMSNorm weight is called `scale` there).
ORIGINAL_NAMES = {
    "attention.img_qkv_proj.weight": "img_qkv_proj.weight",
    "attention.txt_kv_proj.weight": "txt_kv_proj.weight",
    "attention.norm_q.weight": "qk_norm.query_norm.scale",
    "attention.norm_k.weight": "qk_norm.key_norm.scale",
    "attention.norm_added_k.weight": "k_norm.scale",
    "attention.to_out.0.weight": "attn_out.weight",
}


def to_original_name(key: str) -> str:
    head, _, rest = key.partition(".")
    if head != "blocks":
        return key
    index, _, name = rest.partition(".")
    return f"blocks.{index}.{ORIGINAL_NAMES.get(name, name)}"


@pytest.mark.parametrize(
    "suffix, wrapper, zipped",
    [(".pth", "model", True), (".pt", "state_dict", True), (".pth", None, False), (".safetensors", None, None)],
)
def test_original_codebase_transformer(prx_flux, mirage_flux, tmp_path, suffix, wrapper, zipped):
    """A training-codebase state dict (original key names, no config) converts to the same weights and config, from
    torch's zip format and from its older one (which cannot be memory-mapped) alike."""
    source = load_file(prx_flux / "transformer/diffusion_pytorch_model.safetensors")
    original = {to_original_name(k): v for k, v in source.items()}
    assert "blocks.0.qk_norm.query_norm.scale" in original
    path = tmp_path / f"prx{suffix}"
    if suffix == ".safetensors":
        save_file(original, path)
    else:
        torch.save({wrapper: original, "step": 1000} if wrapper else original, path,
                   _use_new_zipfile_serialization=zipped)  # fmt: skip
    convert(prx_flux, tmp_path / "out", "--transformer", path)
    assert_same_tensors(converted(tmp_path / "out", "transformer"), source)
    assert config_of(tmp_path / "out").transformer == config_of(mirage_flux).transformer


def test_full_sharded_t5gemma_keeps_only_the_encoder(prx_flux, tmp_path):
    encoder = load_file(prx_flux / "text_encoder/model.safetensors")
    composite = T5GemmaConfig.from_pretrained(prx_flux / "text_encoder")
    full = T5GemmaForConditionalGeneration(composite)
    full.model.encoder.load_state_dict(encoder)
    full.save_pretrained(tmp_path / "t5gemma", max_shard_size="50KB")
    assert (tmp_path / "t5gemma/model.safetensors.index.json").is_file()
    convert(prx_flux, tmp_path / "out", "--text-encoder", tmp_path / "t5gemma")
    assert_same_tensors(converted(tmp_path / "out", "text_encoder"), encoder)


def to_bfl_name(key: str) -> str:
    """diffusers AutoencoderKL -> Black Forest Labs' ae.safetensors names, spelled out independently."""
    replacements = [
        ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"), ("mid_block.attentions.0.to_q", "mid.attn_1.q"),
        ("mid_block.attentions.0.to_k", "mid.attn_1.k"), ("mid_block.attentions.0.to_v", "mid.attn_1.v"),
        ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"), ("mid_block.resnets.0", "mid.block_1"),
        ("mid_block.resnets.1", "mid.block_2"), ("conv_norm_out", "norm_out"), ("conv_shortcut", "nin_shortcut"),
        ("downsamplers.0", "downsample"), ("upsamplers.0", "upsample"), ("resnets", "block"),
    ]  # fmt: skip
    for new, old in replacements:
        key = key.replace(new, old)
    parts = key.split(".")
    if parts[1] == "down_blocks":
        parts[1] = "down"
    if parts[1] == "up_blocks":  # BFL counts decoder levels from the lowest resolution up
        parts[1:3] = ["up", str(3 - int(parts[2]))]
    return ".".join(parts)


def test_bfl_single_file_flux_vae_in_bf16(prx_flux, tmp_path):
    """ae.safetensors: LDM names, 1x1-conv attention weights, bf16 as published; the dtype is kept."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxVAE(FluxVAEConfig()).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=generator).to(torch.bfloat16) for k, s in shapes.items()}
    bfl = {to_bfl_name(k): v[..., None, None] if ".attn_1." in to_bfl_name(k) and v.ndim == 2 else v for k, v in weights.items()}
    assert "decoder.up.0.block.2.conv1.weight" in bfl and bfl["encoder.mid.attn_1.q.weight"].ndim == 4
    save_file(bfl, tmp_path / "ae.safetensors")
    convert(prx_flux, tmp_path / "out", "--vae", tmp_path / "ae.safetensors")
    assert_same_tensors(converted(tmp_path / "out", "vae"), weights)
    assert config_of(tmp_path / "out").vae == FluxVAEConfig()


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_dtype_flag_casts_floating_tensors(prx_flux, tmp_path, dtype, name):
    convert(prx_flux, tmp_path / "out", "--dtype", name)
    source = load_file(prx_flux / "transformer/diffusion_pytorch_model.safetensors")
    ours = converted(tmp_path / "out", "transformer")
    assert all(ours[k].dtype == dtype and torch.equal(ours[k], v.to(dtype)) for k, v in source.items())


def test_transformers5_tokenizer_json_is_rebuilt_as_sentencepiece(prx_flux, tmp_path):
    reference = GemmaTokenizerFast.from_pretrained(prx_flux / "tokenizer")
    reference.save_pretrained(tmp_path / "tokenizer")
    assert not (tmp_path / "tokenizer/tokenizer.model").exists()
    convert(prx_flux, tmp_path / "out", "--tokenizer", tmp_path / "tokenizer")
    ours = GemmaTokenizer(tmp_path / "out/tokenizer.model", config_of(tmp_path / "out").tokenizer)
    texts = ["a photo of a cat", "東京の夜景 😀 café  two  spaces", "<mask> 12345"]
    ids, mask = ours(texts)
    expected = reference(texts, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    assert ids.tolist() == expected["input_ids"].tolist()
    assert mask.tolist() == expected["attention_mask"].bool().tolist()


def test_hub_ids_go_through_snapshot_download(prx_flux, tmp_path, monkeypatch):
    """A repo id is fetched with huggingface_hub (faked here: no test downloads) and 'distilled' sets 8 / 1.0."""
    asked = []

    def fake_snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(prx_flux)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    convert("Photoroom/prx-256-t2i-sft-distilled", tmp_path / "out")
    assert asked == ["Photoroom/prx-256-t2i-sft-distilled"]
    sampling = config_of(tmp_path / "out").sampling
    assert (sampling.num_inference_steps, sampling.guidance_scale) == (8, 1.0)
    convert(prx_flux, tmp_path / "out2", "--steps", 12, "--guidance", 3.5)
    sampling = config_of(tmp_path / "out2").sampling
    assert (sampling.num_inference_steps, sampling.guidance_scale) == (12, 3.5)


def test_a_failed_hub_download_says_so(tmp_path, monkeypatch):
    def offline(repo_id, **kwargs):
        raise OSError("we are offline\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"ckpts/prx is not a local path, and downloading it from the Hub failed "
                                              r"\(we are offline\): check the path or repo id$"):
        convert("ckpts/prx", tmp_path / "out")


# ---- bad input: one clear error, nothing written ---------------------------------------------------


def broken_copy(src: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(src, folder)
    edit(folder)
    return folder


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def set_vae_class(folder: Path, name: str):
    config = json.loads((folder / "vae/config.json").read_text())
    (folder / "vae/config.json").write_text(json.dumps({**config, "_class_name": name}))


def edit_json(relative: str, **changes):
    """An edit for broken_copy: set keys of a JSON file, or with `whole=` replace its content."""

    def edit(folder: Path):
        path = folder / relative
        data = changes["whole"] if "whole" in changes else {**json.loads(path.read_text()), **changes}
        path.write_text(json.dumps(data))

    return edit


def set_transformer_weight(value: float):
    """An edit for broken_copy: one value of the transformer's txt_in.weight."""

    def edit(folder: Path):
        path = folder / "transformer/diffusion_pytorch_model.safetensors"
        weights = load_file(path)
        weights["txt_in.weight"][0, 0] = value
        save_file(weights, path)

    return edit


def shrink_text_vocabulary(folder: Path):
    """The text encoder's config says 100 ids, the tokenizer makes 800: caught before the weights are compared."""
    path = folder / "text_encoder/config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "encoder": {**config["encoder"], "vocab_size": 100}}))


def widen_text_embeddings(folder: Path):
    """A text encoder twice as wide as the transformer reads: each part matches its own weights."""
    path = folder / "text_encoder/config.json"
    config = json.loads(path.read_text())
    encoder = config["encoder"]
    path.write_text(json.dumps({**config, "encoder": {**encoder, "hidden_size": 2 * encoder["hidden_size"]}}))


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def save_pickle(path, obj):
    torch.save(obj, path)
    return path


def broken(edit):
    return lambda src, tmp: [broken_copy(src, tmp, edit)]


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda src, tmp: [tmp / "missing"], "does not exist"),
        (broken(edit_json("model_index.json", whole=[])), "model_index.json does not hold a JSON object"),
        (broken(edit_json("model_index.json", default_sample_size="512")), "default_sample_size must be an integer"),
        (broken(edit_json("vae/config.json", _class_name=["AutoencoderKL"])), "not a VAE mirage knows"),
        (broken(edit_json("transformer/config.json", hidden_size="64")), "transformer/config.json is not a config"),
        (broken(edit_json("transformer/config.json", depth=2.0)), r"config.json is not a config .*\(depth must be int"),
        (broken(edit_json("transformer/config.json", theta="x")), r"config.json is not a config .*\(theta must be int"),
        (broken(edit_json("text_encoder/config.json", whole={"model_type": "t5gemma"})),
         "text_encoder/config.json is not a config mirage can read"),
        (broken(edit_json("scheduler/scheduler_config.json", shift=[3])), "scheduler_config.json is not a config"),
        (broken(edit_json("scheduler/scheduler_config.json", use_dynamic_shifting=True)),
         "sets scheduler options mirage does not implement: {'use_dynamic_shifting': True}"),
        (broken(edit_json("text_encoder/model.safetensors.index.json", whole={"metadata": {}})),
         "no 'weight_map' entry"),
        (broken(edit_json("text_encoder/model.safetensors.index.json", whole={"weight_map": {"a": "model-1.safetensors"}})),
         "model-1.safetensors, listed in model.safetensors.index.json, is missing"),
        (broken(lambda f: (f / "tokenizer/tokenizer.model").write_bytes(b"not a model")), "not a SentencePiece model"),
        (broken(shrink_text_vocabulary), "has 800 pieces, but the text encoder embeds only 100"),
        (broken(widen_text_embeddings), "-dim text embeddings but the text encoder makes"),
        (lambda src, tmp: [broken_copy(src, tmp, lambda f: truncate(f / "transformer/diffusion_pytorch_model.safetensors"))],
         r"diffusion_pytorch_model.safetensors is not a readable safetensors file \(.*\): download or copy it again$"),
        (lambda src, tmp: [broken_copy(src, tmp, lambda f: set_vae_class(f, "VQModel"))], "not a VAE mirage knows"),
        (lambda src, tmp: [broken_copy(src, tmp, lambda f: (f / "model_index.json").unlink())], "no model_index.json"),
        (lambda src, tmp: [src, "--vae-type", "dc-ae"], "AutoencoderKL"),
        (broken(edit_json("model_index.json", vae=["diffusers", "AutoencoderDC"])),
         r"holds an AutoencoderKL \(flux\), but model_index.json says dc-ae"),
        (lambda src, tmp: [src, "--transformer", write(tmp / "prx.pth", b"not a pickle")],
         r"prx.pth is not a torch pickle of plain tensors \(safe loading refused it\): download or copy it again, or"),
        (lambda src, tmp: [src, "--transformer", write(tmp / "prx.pt", b"PK\x03\x04 cut short")],
         r"prx.pt is not a readable torch checkpoint \(\w+: [^\n]*\): download or copy it again$"),
        (lambda src, tmp: [src, "--transformer", save_pickle(tmp / "prx.pt", [torch.ones(1)])],
         "prx.pt does not hold a state dict of tensors: pass the transformer's weights file"),
        (lambda src, tmp: [broken_copy(src, tmp, set_transformer_weight(1e6)), "--dtype", "fp16"],
         r"the transformer weight txt_in.weight holds values up to 1e\+06, beyond float16's range: convert with"),
        (broken(set_transformer_weight(float("nan"))),
         "the transformer weight txt_in.weight holds inf or NaN in the source: download or copy it again$"),
        (lambda src, tmp: ["--vae", src / "vae"], "no transformer found: pass --transformer PATH"),  # OUT, a part flag
        (lambda src, tmp: [src, "--transformer", src.parent / "prx-dcae/transformer"], "latent channels"),
        (lambda src, tmp: [src, "--text-encoder", src / "vae"], "text_encoder|T5Gemma|model_type"),
    ],
)  # fmt: skip
def test_bad_sources_fail_cleanly(prx_flux, prx_dcae, tmp_path, make_args, message):
    out = tmp_path / "out"
    with pytest.raises((CheckpointError, ValueError), match=message):
        convert(*make_args(prx_flux, tmp_path), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


def test_mismatched_weights_name_the_keys(prx_flux, tmp_path):
    def drop_a_key(folder):
        path = folder / "transformer/diffusion_pytorch_model.safetensors"
        weights = load_file(path)
        weights["blocks.0.gate_proj.weight"] = weights["blocks.0.gate_proj.weight"][:-1]
        del weights["txt_in.bias"]
        save_file(weights, path)

    names = r"txt_in\.bias.*blocks\.0\.gate_proj\.weight \(127, 64\)"
    remedy = "check that its weights and config.json come from one model, or download them again$"
    with pytest.raises(CheckpointError, match=f"{names}.*: {remedy}"):
        convert(broken_copy(prx_flux, tmp_path, drop_a_key), tmp_path / "out")


def test_existing_output_needs_force(prx_flux, mirage_flux, tmp_path):
    out = shutil.copytree(mirage_flux, tmp_path / "out")
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="--force"):
        convert(prx_flux, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(prx_flux, out, "--force")
    assert not (out / "keep.txt").exists() and config_of(out) == config_of(mirage_flux)


def test_force_takes_an_empty_folder(prx_flux, mirage_flux, tmp_path):
    (tmp_path / "out").mkdir()  # made beforehand, say by a mount or `mkdir -p`
    convert(prx_flux, tmp_path / "out", "--force")
    assert config_of(tmp_path / "out") == config_of(mirage_flux)


def test_force_replaces_only_a_converted_checkpoint(prx_flux, mirage_flux, tmp_path, monkeypatch):
    """`--force` on a folder of other files (say, ".") refuses and deletes nothing; "." that is a checkpoint is replaced."""
    other = tmp_path / "project"
    (other / "src").mkdir(parents=True)
    (other / "src" / "keep.txt").write_text("mine")
    monkeypatch.chdir(other)
    with pytest.raises(CheckpointError, match="not a converted checkpoint, and --force replaces only those"):
        convert(prx_flux, ".", "--force")
    for out in (".", "src/keep.txt"):  # without --force too: advising it would only lead to the refusal above
        with pytest.raises(CheckpointError, match=f"{out} is not a converted checkpoint, .*: choose another OUT$"):
            convert(prx_flux, out)
    assert (other / "src" / "keep.txt").read_text() == "mine" and sorted(tmp_path.iterdir()) == [other]
    checkpoint = shutil.copytree(mirage_flux, tmp_path / "checkpoint")
    monkeypatch.chdir(checkpoint)
    convert(prx_flux, ".", "--force", "--steps", "9")
    assert config_of(checkpoint).sampling.num_inference_steps == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "project"]  # no temporary folder left


@pytest.mark.parametrize(
    "out, error, message",
    [
        ("file/sub/out", NotADirectoryError, r"/file is a file, not a folder: choose another OUT$"),
        ("locked/out", PermissionError, r"/locked \(Permission denied\): choose another OUT$"),
    ],
)
def test_an_out_that_cannot_be_written_is_refused_before_reading(prx_flux, tmp_path, monkeypatch, out, error, message):
    (tmp_path / "file").write_text("")
    (tmp_path / "locked").mkdir()
    writable = mirage.tempfile.TemporaryFile

    def temporary_file(dir):  # a folder this user may not write in (root, who runs the tests here, may write anywhere)
        if Path(dir).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied")
        return writable(dir=dir)

    monkeypatch.setattr(mirage.tempfile, "TemporaryFile", temporary_file)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(convert_weights, "gather", lambda args: pytest.fail("read the sources first"))
    with pytest.raises(error, match=message):
        convert(prx_flux, out)


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "convert_weights.py"), str(tmp_path / "nowhere"), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"convert_weights.py: error: {tmp_path / 'nowhere'} does not exist"]
    assert not (tmp_path / "out").exists()


# ---- where the parts come from; sampling defaults ------------------------------------------------


def test_a_part_flag_may_name_another_pipeline(prx_flux, prx_dcae, tmp_path, monkeypatch):
    """--vae/--transformer given a pipeline read its subfolder, and SRC's model_index.json does not judge them;
    a Hub id downloads only that part (FLUX.1-dev's vae/, not its 23 GB transformer)."""
    convert(prx_flux, tmp_path / "a", "--vae", prx_dcae, "--transformer", prx_dcae / "transformer")
    assert config_of(tmp_path / "a").vae_type == "dc-ae"
    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked[repo_id] = allow_patterns
        return str(prx_dcae)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    convert(prx_flux, tmp_path / "b", "--vae", "black-forest-labs/FLUX.1-dev", "--transformer", "someone/prx-dc-ae")
    assert_same_tensors(converted(tmp_path / "b", "vae"), converted(tmp_path / "a", "vae"))
    flux_repo = ["flux1-dev.safetensors", "ae.safetensors", "model_index.json", "README.md", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
                 "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
                 "transformer/diffusion_pytorch_model.safetensors.index.json", "tokenizer_2/tokenizer.json",
                 "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/config.json"]  # fmt: skip
    patterns = asked["black-forest-labs/FLUX.1-dev"]
    fetched = list(huggingface_hub.utils.filter_repo_objects(flux_repo, allow_patterns=patterns))
    assert fetched == ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    t5gemma_repo = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "README.md",
                    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json"]  # fmt: skip
    for part, needed in [("text_encoder", t5gemma_repo[:3]), ("tokenizer", t5gemma_repo[4:7])]:
        patterns = ["model_index.json", *convert_weights.PART_FILES[part]]  # a repo that holds only the part
        assert list(huggingface_hub.utils.filter_repo_objects(t5gemma_repo, allow_patterns=patterns)) == needed


def every_part(spec) -> list:
    return [flag for part in ("transformer", "text-encoder", "tokenizer", "vae") for flag in (f"--{part}", spec)]


def test_sampling_settings_come_with_the_transformer(prx_flux, mirage_flux, tmp_path, capsys, monkeypatch):
    """The scheduler's shift and model_index.json's sample size are read from the pipeline the transformer came
    from (SRC or --transformer's); a bare transformer gets mirage's defaults, said so in the summary; flags win."""
    convert(tmp_path / "parts", *every_part(prx_flux))
    assert config_of(tmp_path / "parts") == config_of(mirage_flux)
    assert "mirage's default" not in capsys.readouterr().out
    other = broken_copy(prx_flux, tmp_path, edit_json("scheduler/scheduler_config.json", shift=1.5))
    edit_json("model_index.json", default_sample_size=1024)(other)
    convert(prx_flux, tmp_path / "moved", "--transformer", other)  # not SRC's 2.5 and 256
    moved = config_of(tmp_path / "moved").sampling
    assert (moved.shift, moved.default_sample_size) == (1.5, 1024)

    bare = [*every_part(prx_flux)[2:], "--transformer", prx_flux / "transformer"]
    convert(tmp_path / "bare", *bare)
    assert config_of(tmp_path / "bare").sampling == convert_weights.SamplingConfig()
    note = ("28 steps, guidance 5.0, shift 3.0, 512 px (mirage's default shift and sample size: the transformer's "
            "source sets none; pass --shift and --sample-size to override)\n")  # fmt: skip
    assert note in capsys.readouterr().out
    convert(tmp_path / "given", *bare, "--shift", 2.5)
    assert "(mirage's default sample size: the transformer's source sets none; pass --sample-size to override)\n" in (
        capsys.readouterr().out
    )
    convert(tmp_path / "both", *bare, "--shift", 2.5, "--sample-size", 256)
    assert config_of(tmp_path / "both") == config_of(mirage_flux) and "mirage's default" not in capsys.readouterr().out
    convert(prx_flux, tmp_path / "over", "--sample-size", 1024)  # over SRC's 256, as --help says
    assert config_of(tmp_path / "over").sampling.default_sample_size == 1024

    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked[repo_id] = allow_patterns
        return str(other)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    convert(prx_flux, tmp_path / "hub", "--transformer", "someone/prx")
    assert config_of(tmp_path / "hub").sampling == moved
    assert "scheduler/scheduler_config.json" in asked["someone/prx"]


def test_variant_files_are_read_with_variant(prx_flux, tmp_path):
    src = broken_copy(prx_flux, tmp_path, lambda f: (f / "vae/diffusion_pytorch_model.safetensors").rename(
        f / "vae/diffusion_pytorch_model.fp16.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"holds no diffusion_pytorch_model\.safetensors \(nor a sharded "
                                              r"index\): its variants: fp16 \(--variant NAME\)$"):
        convert(src, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"^no source file is of --variant bf16; the variants found: fp16$"):
        convert(src, tmp_path / "out", "--variant", "bf16")  # a typo is not read as "the plain files"
    with pytest.raises(CheckpointError, match=r"^no source file is of --variant fp16; the sources have none: drop"):
        convert(prx_flux, tmp_path / "out", "--variant", "fp16")
    convert(src, tmp_path / "out", "--variant", "fp16")  # the other parts have no fp16 files: their plain ones
    original = load_file(prx_flux / "vae/diffusion_pytorch_model.safetensors")
    assert_same_tensors(converted(tmp_path / "out", "vae"), original)


def test_a_variant_is_read_over_the_plain_files_beside_it(prx_flux, tmp_path):
    def add_fp16(folder):
        vae = folder / "vae"
        half = {k: v.half() for k, v in load_file(vae / "diffusion_pytorch_model.safetensors").items()}
        save_file(half, vae / "diffusion_pytorch_model.fp16.safetensors")

    src = broken_copy(prx_flux, tmp_path, add_fp16)
    convert(src, tmp_path / "out", "--variant", "fp16")
    fp16 = load_file(src / "vae/diffusion_pytorch_model.fp16.safetensors")
    assert_same_tensors(converted(tmp_path / "out", "vae"), fp16)


def test_scheduler_keys_left_out_take_diffusers_defaults(prx_flux, tmp_path):
    """A scheduler_config.json may name only its class: its shift and num_train_timesteps are then diffusers'."""
    only_class = {"_class_name": "FlowMatchEulerDiscreteScheduler"}
    src = broken_copy(prx_flux, tmp_path, edit_json("scheduler/scheduler_config.json", whole=only_class))
    convert(src, tmp_path / "out")
    reference = FlowMatchEulerDiscreteScheduler.from_pretrained(src / "scheduler").config
    sampling = config_of(tmp_path / "out").sampling
    assert (sampling.shift, sampling.num_train_timesteps) == (reference.shift, reference.num_train_timesteps)


def test_distilled_is_read_from_the_checkpoint_name_only(prx_flux, tmp_path, capsys):
    base = shutil.copytree(prx_flux, tmp_path / "not-distilled-yet" / "prx-512-t2i-sft")
    convert(base, tmp_path / "a")
    sampling = config_of(tmp_path / "a").sampling
    assert (sampling.num_inference_steps, sampling.guidance_scale) == (28, 5.0)
    distilled = shutil.copytree(prx_flux, tmp_path / "prx-512-t2i-sft-distilled")
    convert(prx_flux, tmp_path / "b", "--transformer", distilled / "transformer")
    sampling = config_of(tmp_path / "b").sampling
    assert (sampling.num_inference_steps, sampling.guidance_scale) == (8, 1.0)
    cached = shutil.copytree(prx_flux, tmp_path / "hub/models--Photoroom--prx-512-t2i-sft-distilled/snapshots/0a1b2c")
    for args in ([cached], ["--transformer", cached / "transformer", "--vae", cached / "vae"]):
        assert convert_weights.distilled_name(convert_weights.parse_args([*map(str, args), "out"])) == distilled.name
    note = "(distilled, by the name prx-512-t2i-sft-distilled: --steps and --guidance set others)"
    assert note in capsys.readouterr().out
    convert(distilled, tmp_path / "c", "--steps", 12)  # the flag over the name's 8
    sampling = config_of(tmp_path / "c").sampling
    assert (sampling.num_inference_steps, sampling.guidance_scale) == (12, 1.0)


def test_a_config_json_without_sampling_settings_reads_the_defaults(mirage_flux):
    """A checkpoint converted before config.json held them; a hand-edited guidance below 1 is refused."""
    saved = json.loads((mirage_flux / "config.json").read_text())
    del saved["sampling"]
    assert MirageConfig.from_dict(saved).sampling == convert_weights.SamplingConfig()
    with pytest.raises(ValueError, match="a finite guidance_scale >= 1, got 28, 0.5"):
        convert_weights.SamplingConfig(guidance_scale=0.5)


def test_original_codebase_mlp_width_survives_the_ratio():
    """The MLP width is int(hidden * ratio); for 352 -> 480, 480 / 352 rounds so that int() gives 479."""
    meta = {"device": "meta"}
    weights = {"img_in.weight": torch.empty(352, 64, **meta), "txt_in.weight": torch.empty(352, 96, **meta),
               "blocks.0.attention.norm_q.weight": torch.empty(32, **meta),
               "blocks.0.gate_proj.weight": torch.empty(480, 352, **meta)}  # fmt: skip
    assert int(352 * (480 / 352)) == 479
    config = convert_weights.infer_transformer_config(weights, latent_channels=16)
    assert int(config.hidden_size * config.mlp_ratio) == 480


def test_two_digit_block_indices_are_renamed_too():
    """The published transformers have more than ten blocks (the tiny test one has two); the norms' weights are
    spelled `scale` in some versions of the training codebase and `weight` in others."""
    for index in (9, 10, 23):
        for name in ORIGINAL_NAMES:
            key = f"blocks.{index}.{name}"
            assert rename_original_key(to_original_name(key)) == key
            assert rename_original_key(to_original_name(key).replace(".scale", ".weight")) == key


# ---- whatever stops a conversion, OUT is whole ----------------------------------------------------


STOPPED_WRITE = """
import os, runpy, signal, sys
import safetensors.torch
from safetensors import SafetensorError

def save_file(*args, **kwargs):  # stands in for the write that the machine stops
    if how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    raise {"memory": MemoryError(), "disk": SafetensorError("I/O error: No space left on device (os error 28)")}[how]

safetensors.torch.save_file = save_file
convert, src, out, how = sys.argv[1:]
sys.argv = [convert, src, out, "--force"]
runpy.run_path(convert, run_name="__main__")
"""


@pytest.mark.parametrize(
    "how, message",
    [
        ("sigterm", "convert_weights.py: interrupted: nothing was half-written"),
        ("memory", "convert_weights.py: error: out of memory: close other programs, or convert on a larger machine"),
        ("disk", r"convert_weights.py: error: writing .*out failed \(I/O error: No space left on device "
                 r"\(os error 28\)\): free some disk space, or choose another OUT"),
    ],
)  # fmt: skip
def test_a_stopped_write_is_one_line_and_leaves_the_old_checkpoint(prx_flux, mirage_flux, tmp_path, how, message):
    out = shutil.copytree(mirage_flux, tmp_path / "out")
    result = subprocess.run([sys.executable, "-c", STOPPED_WRITE, ROOT / "convert_weights.py", prx_flux, out, how],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(message, lines[0]), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    assert_same_tensors(converted(out, "transformer"), converted(mirage_flux, "transformer"))


CTRL_C_WHILE_IMPORTING = """
import os, runpy, signal, sys

class CtrlC:  # a finder asked for torch first: Ctrl-C as torch starts loading
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)

sys.meta_path.insert(0, CtrlC())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_while_torch_loads_is_one_line(prx_flux, tmp_path):
    result = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_IMPORTING, ROOT / "convert_weights.py", prx_flux,
                             tmp_path / "out"], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["convert_weights.py: interrupted: nothing was half-written"]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX's")
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_gets_a_new_files_mode(prx_flux, tmp_path, umask):
    """safetensors makes its files 0o600: readable by their owner only, unlike config.json."""
    old = os.umask(umask)
    try:
        convert(prx_flux, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "out").iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_swap_in_puts_the_old_checkpoint_back_if_the_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(FileNotFoundError):
        convert_weights.swap_in(tmp_path / "vanished", out, tmp_path / ".out.old-1")
    assert (out / "config.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    rename = Path.rename

    def interrupted_after(path, target):  # Ctrl-C just after the old checkpoint went aside
        rename(path, target)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "rename", interrupted_after)
    with pytest.raises(KeyboardInterrupt):
        convert_weights.swap_in(tmp_path / "new", out, tmp_path / ".out.old-1")
    monkeypatch.undo()
    assert (out / "config.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_killed_conversions_are_removed(prx_flux, mirage_flux, tmp_path, monkeypatch):
    """SIGKILL leaves .NAME.tmp-PID: the next conversion to NAME removes those of processes gone (and its own
    PID's, which a container reuses), not those of conversions still running; sample.py never takes them."""
    import sample

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    weights = tmp_path / "weights"
    for name in (f".prx.tmp-{gone.pid}", f".prx.old-{gone.pid}", f".prx.tmp-{os.getpid()}", f".prx.tmp-{os.getppid()}",
                 f".other.tmp-{gone.pid}"):  # fmt: skip
        (weights / name).mkdir(parents=True)
    convert(prx_flux, weights / "prx")
    assert sorted(p.name for p in weights.iterdir()) == [f".other.tmp-{gone.pid}", f".prx.tmp-{os.getppid()}", "prx"]
    monkeypatch.setattr(sample, "WEIGHTS_DIRS", (weights,))
    assert sample.find_weights(None) == weights / "prx"
    # killed between swap_in's two renames: the old checkpoint, set aside, goes back where it was, and is not
    # replaced without --force
    (weights / "prx").rename(weights / f".prx.old-{gone.pid}")
    with pytest.raises(CheckpointError, match="prx already exists: pass --force"):
        convert(prx_flux, weights / "prx")
    assert config_of(weights / "prx") == config_of(mirage_flux)
    # one set aside while OUT is there (converted again since) is only deleted
    shutil.copytree(mirage_flux, weights / f".prx.old-{gone.pid}")
    convert(prx_flux, weights / "prx", "--force")
    assert sorted(p.name for p in weights.iterdir()) == [f".other.tmp-{gone.pid}", f".prx.tmp-{os.getppid()}", "prx"]


def test_a_source_inside_out_is_refused_before_reading(prx_flux, mirage_flux, tmp_path):
    out = shutil.copytree(mirage_flux, tmp_path / "out")
    download = shutil.copytree(prx_flux, out / "hf-download")
    with pytest.raises(CheckpointError, match="hf-download lies inside .*out, which the conversion would replace"):
        convert(download, out, "--force")
    assert (download / "model_index.json").is_file()


def test_a_forgotten_out_is_named(prx_flux):
    result = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), str(prx_flux)], capture_output=True,
                            text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()  # one line, without argparse's usage block
    assert line.endswith(f"give SRC and OUT (only {prx_flux} was given), or OUT and the part flags (see --help)")


@pytest.mark.parametrize(
    "flag, message",
    [
        (["--steps", "-3"], "--steps must be at least 1"),
        (["--guidance", "nan"], "--guidance must be a finite number >= 1"),
        (["--shift", "0"], "--shift must be a finite number > 0"),
    ],
)
def test_sampling_flags_are_refused_by_their_names(flag, message, capsys):
    with pytest.raises(SystemExit):
        convert_weights.parse_args(["src", "out", *flag])
    [line] = capsys.readouterr().err.strip().splitlines()  # one line, without argparse's usage block
    assert line.endswith(f": error: {message} (see --help)")
