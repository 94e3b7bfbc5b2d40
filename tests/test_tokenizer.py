"""Tokenizer parity with transformers' GemmaTokenizerFast (transformers 5), on a small Gemma-like
SentencePiece model trained here: BPE, pad 0 / eos 1 / bos 2 / unk 3, byte fallback, no dummy prefix,
identity normalisation, whitespace-only pieces, split digits, user-defined <mask> and turn markers."""

import dataclasses
import json
import random

import pytest
import sentencepiece
import torch
from transformers import GemmaTokenizerFast

from mirage.configs import TokenizerConfig
from mirage.tokenizer import GemmaTokenizer, sentencepiece_model_from_tokenizer_json
from tiny_checkpoint import PRX_TOKENIZER_CONFIG, tokenizer_folder, train_sentencepiece

TEXTS = [
    "a photo of a cat",
    "A Photo OF a CAT, in the style of Van Gogh. Oil on canvas!",
    "",
    " leading space",
    "trailing space ",
    "two  spaces   three    four",
    "          ten spaces then text          ",
    "tabs\tand\nnewlines\r\n\n\n",
    "1234567890 3.14159 2024-01-01 100%",
    "emoji 😀🎨✨🦄 and a family 👨‍👩‍👧",
    "accents: café naïve résumé über straße; decomposed cafe\u0301",
    "CJK: 東京の夜景 猫と犬 한국어 中文",
    "byte fallback: ʬ 𝔘 \x00 \x7f \ufffd \u200b\ufeff",
    "<mask> a <bos> b <pad><eos><unk> c",
    "<start_of_turn>user\nhi<end_of_turn>",
    "<<mask>> <mask <bos<eos>> <unk",
    "a literal ▁ char▁▁and <0x41> typed",
    "a photo of a cat " * 80,  # > 256 tokens: truncated
]


@pytest.fixture(scope="session")
def spm_model() -> bytes:
    return train_sentencepiece()


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    """tokenizer.model + tokenizer_config.json, as PRX's tokenizer folder (saved by transformers 4)."""
    return tokenizer_folder(tmp_path_factory.mktemp("tokenizer_model"))


def _read_json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def json_folder(tmp_path_factory, model_folder):
    """The same tokenizer saved by transformers 5: tokenizer.json, no tokenizer.model, no add_bos_token."""
    folder = tmp_path_factory.mktemp("tokenizer_json")
    GemmaTokenizerFast.from_pretrained(model_folder).save_pretrained(folder)
    assert not (folder / "tokenizer.model").exists()
    assert "add_bos_token" not in _read_json(folder / "tokenizer_config.json")
    return folder


def _with_config(tmp_path, spm_model: bytes, **changes) -> tuple[GemmaTokenizerFast, GemmaTokenizer]:
    """The reference and ours, both from a tokenizer.model folder whose config has `changes`."""
    config = {**PRX_TOKENIZER_CONFIG, **changes}
    (tmp_path / "tokenizer.model").write_bytes(spm_model)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = GemmaTokenizer(tmp_path / "tokenizer.model", TokenizerConfig.from_tokenizer_config(config))
    return GemmaTokenizerFast.from_pretrained(tmp_path), ours


def assert_same_tokens(ref: GemmaTokenizerFast, ours: GemmaTokenizer, texts, max_length=None, padding="max_length"):
    length = ref.model_max_length if max_length is None else max_length
    expected = ref(texts, padding=padding, max_length=length, truncation=True, return_tensors="pt")
    input_ids, attention_mask = ours(texts, max_length=max_length, padding=padding)
    assert input_ids.dtype == torch.long and attention_mask.dtype == torch.bool
    assert input_ids.tolist() == expected["input_ids"].tolist(), texts
    assert attention_mask.tolist() == expected["attention_mask"].bool().tolist(), texts


def random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = [*"abcdefghijklmnopqrstuvwxyz      \t\n0123456789.,-東京夜景猫犬😀🎨✨éüßñʬ𝔘\x00▁",
                "<mask>", "<bos>", "<pad>", "<eos>", "<unk>", "<start_of_turn>", "photo", "portrait", "    ", "<0x41>"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


# ---- ids and masks equal to GemmaTokenizerFast ---------------------------------------------------


@pytest.fixture(scope="session")
def prx_pair(model_folder):
    config = TokenizerConfig.from_tokenizer_config(PRX_TOKENIZER_CONFIG)
    return GemmaTokenizerFast.from_pretrained(model_folder), GemmaTokenizer(model_folder / "tokenizer.model", config)


@pytest.mark.parametrize("text", TEXTS)
def test_single_prompt_matches_reference(prx_pair, text):
    assert_same_tokens(*prx_pair, [text])


def test_the_table_exercises_what_it_claims(prx_pair, spm_model):
    _, ours = prx_pair
    sp = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    assert any(sp.is_byte(i) for i in ours.encode(TEXTS[12])), "no byte fallback in the table"
    assert any(set(sp.id_to_piece(i)) == {"▁"} and len(sp.id_to_piece(i)) > 1 for i in ours.encode(TEXTS[6]))
    assert len(ours.encode(TEXTS[-1])) > 256
    assert ours.encode("<mask><bos><pad><eos><unk>") == [4, 2, 0, 1, 3]


@pytest.mark.parametrize("max_length", [256, 9, 2, 1])
@pytest.mark.parametrize("padding", ["max_length", "longest"])
def test_batch_with_truncation_matches_reference(prx_pair, max_length, padding):
    assert_same_tokens(*prx_pair, TEXTS, max_length=max_length, padding=padding)


def test_left_padding_and_truncation_keep_bos(prx_pair):
    _, ours = prx_pair
    input_ids, attention_mask = ours(["a cat", "a photo of a cat " * 80])
    assert input_ids.shape == attention_mask.shape == (2, 256)
    assert input_ids[0, -3:].tolist() == [2, *ours.encode("a cat")]  # left padding: text at the end
    assert not attention_mask[0, :-3].any() and (input_ids[0, :-3] == 0).all()
    assert input_ids[1].tolist() == [2, *ours.encode("a photo of a cat " * 80)[:255]]


def test_random_texts_match_reference(prx_pair):
    assert_same_tokens(*prx_pair, random_texts(seed=0, count=400), max_length=48)


# Gemma's user-defined pieces, in miniature: space runs first (ids 4-33), then tab runs and tags.
SPACE_RUNS_FIRST = ",".join(["▁" * k for k in range(2, 32)] + ["\t" * k for k in range(1, 6)] + ["<b>", "<mask>"])


def test_user_defined_space_runs_are_both_typed_tokens_and_bpe_pieces(tmp_path):
    """transformers finds user-defined pieces (Gemma's space runs "▁▁".."▁"*31 among them) in the text as typed
    ("a ▁▁b": a, ▁, ▁▁, b), and its BPE merges spaces into them by id (32 spaces: ▁*16 twice). SentencePiece alone
    finds them after turning spaces into "▁" (a, ▁▁▁, b) and takes the longest (▁*31, then ▁ + what follows)."""
    model = train_sentencepiece(vocab_size=900, user_defined_symbols=SPACE_RUNS_FIRST)
    (tmp_path / "model").mkdir()
    ref, ours = _with_config(tmp_path / "model", model)
    assert ours.encode("a ▁▁b") == [ours._piece_id(p) for p in ("a", "▁", "▁▁", "b")]
    assert ours.encode("a" + " " * 32 + "b") == [ours._piece_id(p) for p in ("a", "▁" * 16, "▁" * 16, "b")]
    rng = random.Random(0)
    alphabet = [*"ab c  \n\t▁", "<b>", "</b>", "photo", " " * 7, "\n\n", "▁▁"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    texts += ["a" + " " * n + "b" for n in range(1, 80)] + ["x ▁▁▁ y", " ▁▁", "▁ ▁▁ ▁▁▁", "<b>bold</b> ▁▁"]
    assert_same_tokens(ref, ours, texts, max_length=96)
    ref.save_pretrained(tmp_path / "json")  # transformers 5: tokenizer.json only; rebuilt, the same ids
    tokenizer_json = _read_json(tmp_path / "json/tokenizer.json")
    config = TokenizerConfig.from_tokenizer_config(_read_json(tmp_path / "json/tokenizer_config.json"), tokenizer_json)
    rebuilt = GemmaTokenizer(sentencepiece_model_from_tokenizer_json(tokenizer_json), config)
    assert_same_tokens(GemmaTokenizerFast.from_pretrained(tmp_path / "json"), rebuilt, texts, max_length=96)
    merges = tokenizer_json["model"]["merges"]  # without the merge that makes "▁▁", transformers never makes it
    merges.remove(next(m for m in merges if "".join(m) == "▁▁"))
    with pytest.raises(ValueError, match="'▁' \\+ '▁' forms '▁▁' but is not a listed merge"):
        sentencepiece_model_from_tokenizer_json(tokenizer_json)


def test_user_defined_scores_keep_their_id_order_between_their_neighbours():
    """SentencePiece merges the highest score first: unscored user-defined pieces placed before the first normal
    piece, after the last, or between two, must score strictly between those neighbours and fall with their id."""
    from mirage.tokenizer import _between

    for before, after in [(None, None), (None, -3.0), (-5.0, None), (-5.0, -6.0)]:
        scores = [_between(before, after, k, 4) for k in range(4)]
        assert all(a > b for a, b in zip(scores, scores[1:])), (before, after, scores)
        assert (before is None or scores[0] < before) and (after is None or scores[-1] > after), (before, after, scores)


def test_piece_types_are_read_from_any_layout_of_the_protobuf():
    """The shortcut for SentencePiece's own layout (text under 128 bytes, score, type unless normal), and the
    field-by-field reading for every other: long texts, no score, fields in another order."""
    from mirage.tokenizer import _bytes_field, _float_field, _piece_message, _typed_pieces, _varint_field

    def piece(*fields):
        return _bytes_field(1, b"".join(fields))

    text = lambda data: _bytes_field(1, data)  # noqa: E731
    pieces = [
        _bytes_field(1, _piece_message("a" * 127, -1.0, 4)),  # the shortcut: user-defined
        _bytes_field(1, _piece_message("b" * 200, -2.0, 3)),  # a two-byte text length: control
        _bytes_field(1, _piece_message("▁b", -3.0, 1)),  # normal, type written
        piece(text(b"c"), _float_field(2, -4.0)),  # normal, no type
        piece(text(b"\x15" * 3), _varint_field(3, 4)),  # no score
        piece(_float_field(2, 0.0), text(b"\x80\xff"), _varint_field(3, 6)),  # score first
        piece(text(b"d")),  # text only
    ]
    trainer_spec = _bytes_field(2, _varint_field(3, 2))
    typed = _typed_pieces(b"".join(pieces) + trainer_spec)
    assert {i: kind for i, (_, _, kind) in typed.items()} == {0: 4, 1: 3, 4: 4, 5: 6}
    start, end, _ = typed[4]
    assert b"".join(pieces)[start:end] == pieces[4]


def test_right_padding_from_config(tmp_path, spm_model):
    ref, ours = _with_config(tmp_path, spm_model, padding_side="right")
    assert ours.config.padding_side == "right" and ref.padding_side == "right"
    assert_same_tokens(ref, ours, TEXTS, max_length=12)
    assert_same_tokens(ref, ours, TEXTS[:5], padding="longest")


def test_bos_from_config(tmp_path, spm_model):
    """<bos> is prepended because PRX's tokenizer_config.json says so (add_bos_token): a folder saying not gets none."""
    ref, ours = _with_config(tmp_path, spm_model, add_bos_token=False)
    assert_same_tokens(ref, ours, TEXTS, max_length=10)  # truncation keeps 10 text tokens
    assert ours(["a photo of a cat"], max_length=3)[0].tolist() == [ours.encode("a photo of a cat")[:3]]


def test_eos_from_config(tmp_path, spm_model):
    ref, ours = _with_config(tmp_path, spm_model, add_eos_token=True)
    assert_same_tokens(ref, ours, TEXTS, max_length=10)  # truncation keeps <bos> + 8 + <eos>
    assert ours(["a photo of a cat"], max_length=10)[0][0, -1].item() == 1


# ---- tokenizer.json (transformers 5) -> tokenizer.model ------------------------------------------


@pytest.fixture(scope="session")
def converted_pair(json_folder):
    tokenizer_json = _read_json(json_folder / "tokenizer.json")
    config = TokenizerConfig.from_tokenizer_config(_read_json(json_folder / "tokenizer_config.json"), tokenizer_json)
    ours = GemmaTokenizer(sentencepiece_model_from_tokenizer_json(tokenizer_json), config)
    return GemmaTokenizerFast.from_pretrained(json_folder), ours


def test_converted_tokenizer_json_matches_reference(converted_pair):
    ref, ours = converted_pair
    assert ours.config == TokenizerConfig()  # <bos> from the post-processor, the rest from defaults
    for text in TEXTS:
        assert_same_tokens(ref, ours, [text])
    assert_same_tokens(ref, ours, TEXTS, max_length=9)
    assert_same_tokens(ref, ours, random_texts(seed=1, count=400), max_length=48)


def test_converted_model_equals_trained_model(spm_model, json_folder):
    trained = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    converted_model = sentencepiece_model_from_tokenizer_json(_read_json(json_folder / "tokenizer.json"))
    converted = sentencepiece.SentencePieceProcessor(model_proto=converted_model)
    assert converted.get_piece_size() == trained.get_piece_size()
    for i in range(trained.get_piece_size()):
        assert converted.id_to_piece(i) == trained.id_to_piece(i)
        assert converted.is_byte(i) == trained.is_byte(i) and converted.is_unknown(i) == trained.is_unknown(i)
    assert (converted.pad_id(), converted.eos_id(), converted.bos_id(), converted.unk_id()) == (0, 1, 2, 3)
    for text in TEXTS + random_texts(seed=2, count=300):
        text = text.replace("<", "")  # plain text: no literals, only SentencePiece's own BPE
        assert converted.encode(text) == trained.encode(text), text


def test_converted_proto_fields(json_folder):
    from transformers.convert_slow_tokenizer import import_protobuf  # protobuf: a test-only dependency

    model_pb2 = import_protobuf()
    proto = model_pb2.ModelProto()
    proto.ParseFromString(sentencepiece_model_from_tokenizer_json(_read_json(json_folder / "tokenizer.json")))
    assert proto.trainer_spec.model_type == model_pb2.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.add_dummy_prefix
    assert not proto.normalizer_spec.remove_extra_whitespaces and proto.normalizer_spec.escape_whitespaces
    assert proto.pieces[4].piece == "<mask>" and proto.pieces[4].type == model_pb2.ModelProto.SentencePiece.CONTROL
    assert proto.pieces[5].type == model_pb2.ModelProto.SentencePiece.USER_DEFINED  # <start_of_turn>: not special


def _break_merge_group(j):
    merges = j["model"]["merges"]
    joined = ["".join(m) for m in merges]
    at = next(i for i, piece in enumerate(joined) if joined.count(piece) > 1)
    merges.append(merges.pop(at))


def _drop_needed_merge(j):
    at = next(i for i, (a, b) in enumerate(j["model"]["merges"]) if len(a) > 1 and len(b) > 1)
    del j["model"]["merges"][at]


def _rename_piece(j, old, new):
    vocab = j["model"]["vocab"]
    vocab[new] = vocab.pop(old)


BROKEN_TOKENIZER_JSON = {
    "unigram": lambda j: j["model"].update(type="Unigram"),
    "merge groups apart": _break_merge_group,
    "missing merge": _drop_needed_merge,
    "added token beyond vocab": lambda j: j["added_tokens"].append({**j["added_tokens"][0], "id": 10**6}),
    "added token lstrip": lambda j: j["added_tokens"][4].update(lstrip=True),
    "added token rstrip": lambda j: j["added_tokens"][4].update(rstrip=True),
    "added token single word": lambda j: j["added_tokens"][4].update(single_word=True),
    "added token normalized": lambda j: j["added_tokens"][4].update(normalized=True),
    "added token not its piece": lambda j: j["added_tokens"][4].update(content="<not the piece>"),
    "missing byte piece": lambda j: _rename_piece(j, "<0x09>", "<0x09>?"),
    "unknown token missing": lambda j: _rename_piece(j, "<unk>", "<unknown>"),
}


@pytest.mark.parametrize("breakage", BROKEN_TOKENIZER_JSON)
def test_inexpressible_tokenizer_json_raises(json_folder, breakage):
    tokenizer_json = _read_json(json_folder / "tokenizer.json")
    sentencepiece_model_from_tokenizer_json(tokenizer_json)  # fine before the breakage
    BROKEN_TOKENIZER_JSON[breakage](tokenizer_json)
    with pytest.raises(ValueError, match="--tokenizer"):
        sentencepiece_model_from_tokenizer_json(tokenizer_json)


# ---- configuration and bad input -----------------------------------------------------------------


def test_config_from_tokenizer_config():
    assert TokenizerConfig.from_tokenizer_config({}) == TokenizerConfig()
    assert TokenizerConfig.from_tokenizer_config(PRX_TOKENIZER_CONFIG) == TokenizerConfig()
    unset = TokenizerConfig.from_tokenizer_config({"model_max_length": 1000000000000000019884624838656})
    assert unset.model_max_length == 256  # transformers' "no limit" sentinel: PRX's 256 holds
    config = TokenizerConfig.from_tokenizer_config(
        {"padding_side": "right", "model_max_length": 77, "pad_token": {"__type": "AddedToken", "content": "<eos>"}}
    )
    assert (config.padding_side, config.model_max_length, config.pad_token) == ("right", 77, "<eos>")
    assert TokenizerConfig(**dataclasses.asdict(config)) == config


def test_config_bos_eos_follow_the_post_processor_over_the_flags():
    def template(*items):
        single = [{"Sequence": {"id": "A", "type_id": 0}} if t == "$A" else {"SpecialToken": {"id": t, "type_id": 0}}
                  for t in items]
        return {"post_processor": {"type": "TemplateProcessing", "single": single}}

    flags = {"add_bos_token": False, "add_eos_token": False}  # ignored by transformers 5 when tokenizer.json exists
    config = TokenizerConfig.from_tokenizer_config(flags, template("<bos>", "$A", "<eos>"))
    assert config.add_bos_token and config.add_eos_token
    assert not TokenizerConfig.from_tokenizer_config({}, template("$A")).add_bos_token
    assert not TokenizerConfig.from_tokenizer_config({}, {"post_processor": None}).add_bos_token
    with pytest.raises(ValueError, match="template"):
        TokenizerConfig.from_tokenizer_config({}, template("<bos>", "<bos>", "$A"))


def test_transformers_ignores_the_flags_next_to_tokenizer_json(tmp_path, json_folder):
    config = {**_read_json(json_folder / "tokenizer_config.json"), "add_bos_token": False}
    tokenizer_json = _read_json(json_folder / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    model = sentencepiece_model_from_tokenizer_json(tokenizer_json)
    ours = GemmaTokenizer(model, TokenizerConfig.from_tokenizer_config(config, tokenizer_json))
    assert_same_tokens(GemmaTokenizerFast.from_pretrained(tmp_path), ours, TEXTS[:3])
    assert ours(["a"])[0][0, -2].item() == 2


@pytest.mark.parametrize(
    "d",
    [
        {"tokenizer_class": "T5Tokenizer"},
        {"truncation_side": "left"},
        {"split_special_tokens": True},
        {"padding_side": "middle"},
        {"model_max_length": 1, "add_eos_token": True},
        {"pad_token": None},
    ],
)
def test_config_rejects_unsupported(d):
    with pytest.raises(ValueError):
        TokenizerConfig.from_tokenizer_config(d)


def test_tokenizer_rejects_bad_input(spm_model):
    ours = GemmaTokenizer(spm_model, TokenizerConfig(add_eos_token=True))
    for texts, kwargs in [("a cat", {}), ([], {}), (["a"], {"padding": "do_not_pad"}), (["a"], {"max_length": 1})]:
        with pytest.raises(ValueError):
            ours(texts, **kwargs)
    with pytest.raises(ValueError, match="no piece"):
        GemmaTokenizer(spm_model, TokenizerConfig(pad_token="<padding>"))


def test_tokenizer_rejects_a_normalising_model():
    t5_like = train_sentencepiece(  # T5-style normalisation: NFKC, dummy prefix, whitespace folding
        vocab_size=600, add_dummy_prefix=True, normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
        allow_whitespace_only_pieces=False,
    )
    with pytest.raises(ValueError, match="not a Gemma"):
        GemmaTokenizer(t5_like)
