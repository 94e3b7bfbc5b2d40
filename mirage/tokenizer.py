"""Gemma's SentencePiece tokenizer, giving the ids and masks of transformers' `GemmaTokenizerFast`.

Follows transformers 5's `GemmaTokenizer` as PRX's pipeline calls it: BPE with byte fallback, spaces
become "▁" and nothing else is normalised, no dummy prefix; "<bos>" first (as the config says),
truncation keeps the special tokens and as many text tokens as fit in max_length, padding on the
configured side (left by default) with an attention mask. Special-token literals typed in a prompt
("<bos>", "<pad>", "<mask>", any control or user-defined piece of the model) become their ids, as
transformers' added tokens do. Built on `sentencepiece` and a `tokenizer.model`, whose BPE reproduces
transformers' ids once its user-defined pieces are made normal ones (`_user_defined_as_normal`).

A folder saved by transformers 5 has only `tokenizer.json`: `sentencepiece_model_from_tokenizer_json`
rebuilds the `tokenizer.model` from it, writing the few protobuf fields SentencePiece reads by hand
(protobuf is not a dependency), and refuses files whose merges SentencePiece cannot express.
"""

import os
import re
import struct
from pathlib import Path

import sentencepiece
import torch

from mirage.configs import TokenizerConfig


class GemmaTokenizer:
    """Prompts -> (input_ids, attention_mask) exactly as GemmaTokenizerFast with truncation and padding."""

    def __init__(self, model_file: str | os.PathLike | bytes, config: TokenizerConfig = TokenizerConfig()):
        proto = model_file if isinstance(model_file, bytes) else Path(model_file).read_bytes()
        self.config = config
        try:
            sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as err:  # sentencepiece reports an unparsable model as an INTERNAL error
            raise ValueError(f"not a SentencePiece model ({err})") from None
        if sp.get_piece_size() == 0:  # an empty file parses as a model with nothing in it
            raise ValueError("not a SentencePiece model (it holds no pieces)")
        _check_gemma_normalizer(sp)
        typed = _typed_pieces(proto)  # SentencePiece's Python API does not say which pieces are user-defined
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=_user_defined_as_normal(proto, typed, sp))
        self.bos_id, self.eos_id, self.pad_id = (
            self._piece_id(token) for token in (config.bos_token, config.eos_token, config.pad_token)
        )
        # transformers finds control, unknown and user-defined pieces in the text as typed (added tokens);
        # SentencePiece spells out the first two, and would find the last after turning spaces into "▁" (in
        # "a ▁▁b", "▁▁▁" where transformers takes "▁" and the typed "▁▁"). So all three are found here, and
        # SentencePiece encodes what lies between them.
        added = (_CONTROL, _UNKNOWN, _USER_DEFINED)
        self._literal_ids = {sp.id_to_piece(i): i for i, (_, _, kind) in typed.items() if kind in added}
        longest_first = sorted(self._literal_ids, key=len, reverse=True)  # leftmost-longest, as transformers
        self._literals = re.compile("|".join(map(re.escape, longest_first)))

    @property
    def vocab_size(self) -> int:
        """How many pieces the model has: the ids it makes are below this."""
        return self._sp.get_piece_size()

    def _piece_id(self, piece: str) -> int:
        piece_id = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(piece_id) != piece:
            raise ValueError(f"the tokenizer model has no piece {piece!r}")
        return piece_id

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without <bos>/<eos>, untruncated."""
        ids, start = [], 0
        for match in self._literals.finditer(text):
            ids += self._sp.encode(text[start : match.start()])
            ids.append(self._literal_ids[match.group()])
            start = match.end()
        return ids + self._sp.encode(text[start:])

    def __call__(
        self, texts: list[str], max_length: int | None = None, padding: str = "max_length"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise a batch: input_ids [B, L] long and attention_mask [B, L] bool, where L is max_length
        (default: the config's model_max_length) with padding="max_length", or the longest row with
        padding="longest". Longer rows keep <bos> (and <eos>, if the config adds it) and the text tokens that fit."""
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty list of strings")
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        max_length = self.config.model_max_length if max_length is None else max_length
        prefix = [self.bos_id] if self.config.add_bos_token else []
        suffix = [self.eos_id] if self.config.add_eos_token else []
        room = max_length - len(prefix) - len(suffix)
        if room < 0:
            raise ValueError(f"max_length {max_length} is shorter than <bos>/<eos> together")
        rows = [prefix + self.encode(text)[:room] + suffix for text in texts]
        length = max_length if padding == "max_length" else max(map(len, rows))
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros(len(rows), length, dtype=torch.bool)  # [B, L]
        for i, row in enumerate(rows):
            at = slice(length - len(row), length) if self.config.padding_side == "left" else slice(0, len(row))
            input_ids[i, at] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, at] = True
        return input_ids, attention_mask


def _check_gemma_normalizer(sp: sentencepiece.SentencePieceProcessor) -> None:
    """Gemma's model only escapes spaces: no dummy prefix, no whitespace folding, no NFKC. Another
    model (T5's, Llama's) would tokenise differently from GemmaTokenizerFast, so it is refused."""
    probe = " a  b\t\nＡ①ﬁ "  # full-width A, circled 1 and the fi ligature change under NFKC
    if sp.normalize(probe) != probe.replace(" ", "▁"):
        raise ValueError(
            "not a Gemma SentencePiece model: it normalises text (dummy prefix, whitespace folding or NFKC)"
        )


# ---- a tokenizer.model's protobuf: its pieces' types; its user-defined pieces made normal ------------

# Field numbers of sentencepiece_model.proto read and written below.
_MODEL_PIECES, _MODEL_TRAINER_SPEC, _MODEL_NORMALIZER_SPEC = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_VOCAB_SIZE, _TRAINER_BYTE_FALLBACK = 3, 4, 35
_TRAINER_UNK_ID, _TRAINER_BOS_ID, _TRAINER_EOS_ID, _TRAINER_PAD_ID = 40, 41, 42, 43
_TRAINER_UNK_PIECE, _TRAINER_BOS_PIECE, _TRAINER_EOS_PIECE, _TRAINER_PAD_PIECE = 45, 46, 47, 48
_NORMALIZER_NAME, _NORMALIZER_ADD_DUMMY_PREFIX, _NORMALIZER_REMOVE_EXTRA_WHITESPACES = 1, 3, 4
_NORMALIZER_ESCAPE_WHITESPACES = 5
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6  # SentencePiece.Type
_BPE = 2  # TrainerSpec.ModelType

_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_NEEDS_TOKENIZER_MODEL = "pass --tokenizer with a folder that has tokenizer.model"


def _typed_pieces(proto: bytes) -> dict[int, tuple[int, int, int]]:
    """{id: (start, end, type)} of the field of each piece of a serialized ModelProto that is not a normal one."""
    typed, piece_id, start = {}, 0, 0
    while start < len(proto):
        key, size, at = proto[start], proto[start + 1], start + 2  # nearly always: one-byte key, one-byte length
        if key >= 0x80 or size >= 0x80:
            key, at = _read_varint(proto, start)
            size, at = _read_varint(proto, at)  # every field of a ModelProto is a message (length-delimited)
        if key >> 3 == _MODEL_PIECES:
            kind = _piece_type(proto, at, at + size)
            if kind != _NORMAL:
                typed[piece_id] = (start, at + size, kind)
            piece_id += 1
        start = at + size
    return typed


def _piece_type(proto: bytes, at: int, end: int) -> int:
    """The type of the piece message proto[at:end]. SentencePiece writes its text (field 1), score (field 2, four
    bytes), then type (field 3) unless normal: read so where the text is shorter than 128 bytes (Gemma's 256,000
    pieces in ~0.3 s), field by field otherwise."""
    text_length = proto[at + 1]
    # A key byte is field number << 3 | wire type: 0x0A the text (field 1, length-delimited), 0x15 the score
    # (field 2, four bytes), 0x18 the type (field 3, a varint).
    plain = 2 + text_length + 5  # the text's key, length and bytes; the score's key and four bytes
    if end - at in (plain, plain + 2) and proto[at] == 0x0A and text_length < 0x80 and proto[at + plain - 5] == 0x15:
        return proto[end - 1] if end - at == plain + 2 else _NORMAL  # then the type's key and value, or nothing
    return dict(_fields(proto[at:end])).get(_PIECE_TYPE, _NORMAL)


def _fields(data: bytes):
    """(number, value) of each field of a protobuf message: the value is an int (varint) or bytes."""
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _read_varint(data, at)
        else:
            size, at = ({1: 8, 5: 4}[wire], at) if wire in (1, 5) else _read_varint(data, at)  # else: 2, length first
            value, at = data[at : at + size], at + size
        yield number, value


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _user_defined_as_normal(
    proto: bytes, typed: dict[int, tuple[int, int, int]], sp: sentencepiece.SentencePieceProcessor
) -> bytes:
    """The model with its user-defined pieces made normal ones, scored to take their place by id among them.

    transformers gives user-defined pieces two parts: added tokens, found in the text as typed (see `encode`),
    and BPE pieces like any other, its merges ranked by the id of the piece they make. So 32 spaces are two
    16-space pieces there (no merge makes 32), where SentencePiece takes its longest user-defined run of 31,
    then "▁" + what follows. SentencePiece merges the highest score first, and a trained model's scores fall
    with the id: a user-defined piece (scored 0 by SentencePiece's trainer) gets a score between those of the
    normal pieces before and after it (Gemma's all come first: above every normal piece). One rebuilt from a
    tokenizer.json already has the score of its rank there (`_merge_scores`), and keeps it."""

    def normal_piece(i: int, step: int) -> int | None:  # the nearest normal piece before (-1) or after (+1) id i
        i += step
        while i in typed:
            i += step
        return i if 0 <= i < sp.get_piece_size() else None

    scores, unscored = {}, {}  # {id: score}; {(normal piece before, after): [ids between them]}
    for i in sorted(i for i, (_, _, kind) in typed.items() if kind == _USER_DEFINED):
        if sp.get_score(i) != 0:
            scores[i] = sp.get_score(i)
        else:
            unscored.setdefault((normal_piece(i, -1), normal_piece(i, 1)), []).append(i)
    for (before, after), run in unscored.items():
        before, after = (None if j is None else sp.get_score(j) for j in (before, after))
        scores.update((i, _between(before, after, k, len(run))) for k, i in enumerate(run))
    parts, at = [], 0
    for i in sorted(scores):
        start, end, _ = typed[i]
        parts += [proto[at:start], _bytes_field(_MODEL_PIECES, _piece_message(sp.id_to_piece(i), scores[i], _NORMAL))]
        at = end
    return b"".join([*parts, proto[at:]])


def _between(before: float | None, after: float | None, k: int, n: int) -> float:
    """The score of the k-th of n pieces placed in order between the scores `before` and `after` (None: none)."""
    if before is None:
        return (0.0 if after is None else after) + n - k
    if after is None:
        return before - 1 - k
    return before - (before - after) * (k + 1) / (n + 1)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # protobuf writes a negative int32 (an absent id, -1) as 64-bit two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)  # wire type 0


def _float_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)  # wire type 5: 32-bit


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data  # wire type 2: length-delimited


# ---- tokenizer.json -> tokenizer.model ---------------------------------------------------------


def sentencepiece_model_from_tokenizer_json(tokenizer_json: dict) -> bytes:
    """A serialized SentencePiece ModelProto giving the same ids as a Gemma `tokenizer.json` dict.

    transformers 5's GemmaTokenizer takes only the vocabulary, the merges and the added tokens from
    the file (it rebuilds normaliser, pre-tokenizer and byte fallback itself); so do we. Its BPE merges
    the adjacent pair listed first in `merges`; SentencePiece's merges the pair whose joined piece has
    the highest score, leftmost first. They agree when every pair of symbols that joins into a piece is
    a listed merge and the merges into one piece are listed together: a piece's score then falls with
    the rank of its group. Files that break this raise ValueError."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json holds a {model.get('type')!r} model, not BPE: {_NEEDS_TOKENIZER_MODEL}")
    vocab: dict[str, int] = model["vocab"]
    pieces = sorted(vocab, key=vocab.get)
    if [vocab[p] for p in pieces] != list(range(len(pieces))):
        raise ValueError(f"tokenizer.json vocabulary ids are not 0..{len(pieces) - 1}: {_NEEDS_TOKENIZER_MODEL}")
    types = _piece_types(pieces, tokenizer_json.get("added_tokens", []), model.get("unk_token") or "<unk>")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    scores = _merge_scores(merges, vocab, types)
    _check_merges_complete(pieces, types, set(merges))

    pieces_proto = b"".join(
        _bytes_field(_MODEL_PIECES, _piece_message(piece, scores.get(piece, 0.0), kind))  # unmerged: score unread
        for piece, kind in zip(pieces, types)
    )
    return (
        pieces_proto
        + _bytes_field(_MODEL_TRAINER_SPEC, _trainer_spec(pieces, types))
        + _bytes_field(_MODEL_NORMALIZER_SPEC, _GEMMA_NORMALIZER_SPEC)
    )


# Gemma's normaliser: identity (no character map), no dummy prefix, spaces kept and escaped to "▁".
_GEMMA_NORMALIZER_SPEC = (
    _bytes_field(_NORMALIZER_NAME, b"identity")
    + _varint_field(_NORMALIZER_ADD_DUMMY_PREFIX, 0)
    + _varint_field(_NORMALIZER_REMOVE_EXTRA_WHITESPACES, 0)
    + _varint_field(_NORMALIZER_ESCAPE_WHITESPACES, 1)
)


def _trainer_spec(pieces: list[str], types: list[int]) -> bytes:
    """BPE with byte fallback, and the special pieces. SentencePiece finds <bos>/<eos>/<pad> by name
    (its defaults are <s>, </s>) as well as by id; -1 means none."""
    unk = pieces[types.index(_UNKNOWN)]
    spec = (
        _varint_field(_TRAINER_MODEL_TYPE, _BPE)
        + _varint_field(_TRAINER_VOCAB_SIZE, len(pieces))
        + _varint_field(_TRAINER_BYTE_FALLBACK, 1)
    )
    for id_field, piece_field, piece in [
        (_TRAINER_UNK_ID, _TRAINER_UNK_PIECE, unk),
        (_TRAINER_BOS_ID, _TRAINER_BOS_PIECE, "<bos>"),
        (_TRAINER_EOS_ID, _TRAINER_EOS_PIECE, "<eos>"),
        (_TRAINER_PAD_ID, _TRAINER_PAD_PIECE, "<pad>"),
    ]:
        piece_id = pieces.index(piece) if piece in pieces else -1
        spec += _varint_field(id_field, piece_id) + _bytes_field(piece_field, piece.encode())
    return spec


def _piece_message(piece: str, score: float, kind: int) -> bytes:
    return (
        _bytes_field(_PIECE_TEXT, piece.encode())
        + _float_field(_PIECE_SCORE, score)
        + _varint_field(_PIECE_TYPE, kind)
    )


def _piece_types(pieces: list[str], added_tokens: list[dict], unk_token: str) -> list[int]:
    """SentencePiece types: added special tokens are control pieces (matched whole in text, never
    merged), other added tokens user-defined, <0xXX> bytes the byte-fallback pieces, the rest normal."""
    types = [_BYTE if _BYTE_PIECE.fullmatch(piece) else _NORMAL for piece in pieces]
    for token in added_tokens:
        token_id, content = token["id"], token["content"]
        if token_id >= len(pieces) or pieces[token_id] != content:
            raise ValueError(f"added token {content!r} (id {token_id}) is not a piece: {_NEEDS_TOKENIZER_MODEL}")
        if token.get("normalized") or token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            raise ValueError(f"added token {content!r} has options SentencePiece lacks: {_NEEDS_TOKENIZER_MODEL}")
        if types[token_id] == _BYTE:
            raise ValueError(f"byte piece {content!r} is also an added token: {_NEEDS_TOKENIZER_MODEL}")
        types[token_id] = _CONTROL if token.get("special") else _USER_DEFINED
    if unk_token not in pieces:
        raise ValueError(f"the unknown token {unk_token!r} is not in the vocabulary: {_NEEDS_TOKENIZER_MODEL}")
    types[pieces.index(unk_token)] = _UNKNOWN
    # SentencePiece refuses byte fallback without all 256 byte pieces (older Gemma vocabularies
    # hold "\t" in the place of "<0x09>": those need their tokenizer.model).
    if types.count(_BYTE) != 256:
        raise ValueError(f"tokenizer.json has {types.count(_BYTE)} byte pieces, not 256: {_NEEDS_TOKENIZER_MODEL}")
    return types


def _merge_scores(merges: list[tuple], vocab: dict[str, int], types: list[int]) -> dict[str, float]:
    """Score of each merged piece: -1 - the rank of its group of merges, which must be contiguous (never 0, which
    marks a user-defined piece without a rank: see `_user_defined_as_normal`)."""
    scores: dict[str, float] = {}
    previous = None
    for merge in merges:
        if len(merge) != 2 or any(part not in vocab for part in merge) or "".join(merge) not in vocab:
            raise ValueError(f"merge {merge} does not join two pieces into a piece: {_NEEDS_TOKENIZER_MODEL}")
        joined = "".join(merge)
        if types[vocab[joined]] == _BYTE:
            raise ValueError(f"merge {merge} forms a byte piece: {_NEEDS_TOKENIZER_MODEL}")
        if joined != previous:
            if joined in scores:  # a later group for the same piece: no single score orders it
                raise ValueError(f"the merges into {joined!r} are not listed together: {_NEEDS_TOKENIZER_MODEL}")
            scores[joined] = float(-1 - len(scores))
        previous = joined
    return scores


def _check_merges_complete(pieces: list[str], types: list[int], merges: set[tuple]) -> None:
    """SentencePiece joins any two adjacent symbols that form a normal piece; transformers only listed
    pairs. Symbols are normal pieces or single characters (out-of-vocabulary ones included: transformers
    turns those into bytes at once, SentencePiece only after merging), so every such split of a normal
    piece must be a listed merge. User-defined pieces with a "▁" count as normal: mirage makes them normal
    (`_user_defined_as_normal`), and typed spaces can form them (others are only found as typed)."""
    normal = {p for p, t in zip(pieces, types) if t == _NORMAL or (t == _USER_DEFINED and "▁" in p)}
    whole = set(pieces) - normal  # never merged: split out, or bytes

    def symbol(s: str) -> bool:
        return s in normal or (len(s) == 1 and s not in whole)

    for piece in normal:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if symbol(left) and symbol(right) and (left, right) not in merges:
                raise ValueError(
                    f"{left!r} + {right!r} forms {piece!r} but is not a listed merge: {_NEEDS_TOKENIZER_MODEL}"
                )
