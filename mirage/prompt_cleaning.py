"""Prompt cleaning exactly as PRX was trained: DeepFloyd IF's caption cleaning, lower-cased.

Follows Photoroom's training code (Photoroom/PRX `models/text_tower.py`, `TextTower.clean_text` and
`basic_clean`, as of the T5Gemma text tower that trained the published checkpoints), which diffusers'
`PRXPipeline` copies as `TextPreprocessor`. One deviation from diffusers 0.42.1, on purpose: its two
quote classes lost the curly quotes (“ ” and ‘ ’) on the way, so it no longer straightens them before
quote runs collapse; we keep them, as training did.

`clean_prompt` is the full cleaning; `basic_clean` is the light one diffusers runs for
`skip_text_cleaning=True`. The steps run in the training code's order, each on the previous result;
the order matters (quotes are straightened before quote runs collapse, ftfy runs mid-way).
"""

import html
import re
import urllib.parse

import ftfy


def _steps(*pairs: tuple[str, str]) -> tuple[tuple[re.Pattern, str], ...]:
    return tuple((re.compile(pattern), replacement) for pattern, replacement in pairs)


_BEFORE_FTFY = _steps(
    ("<person>", "person"),
    # urls: scheme:// or www: prefixes, or host names ending in a common top-level domain
    (r"\b((?:https?|www):(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@))", ""),
    (r"@[\w\d]+\b", ""),  # @handles
    # CJK strokes, katakana extensions, enclosed letters, compatibility, ideographs, hexagrams (one
    # range at a time, as trained: a run spanning two ranges is removed in two passes, to the same end)
    (r"[\u31c0-\u31ef]+", ""),
    (r"[\u31f0-\u31ff]+", ""),
    (r"[\u3200-\u32ff]+", ""),
    (r"[\u3300-\u33ff]+", ""),
    (r"[\u3400-\u4dbf]+", ""),
    (r"[\u4dc0-\u4dff]+", ""),
    (r"[\u4e00-\u9fff]+", ""),
    # every kind of dash, runs included, becomes one "-"
    (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+", "-"),
    # quotes to one standard; diffusers 0.42.1 lost “ ” and ‘ ’ from these two classes (see module docstring)
    ("[`´«»“”¨]", '"'),
    ("[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IPv4 addresses
    (r"\d:\d\d\s+$", ""),  # trailing article ids
    (r"\\n", " "),  # a literal backslash-n left in scraped captions
    (r"#\d{1,3}\b", ""),  # "#123"
    (r"#\d{5,}\b", ""),  # "#12345..."
    (r"\b\d{6,}\b", ""),  # "123456..."
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", '"'),  # '""SALE""' -> '"SALE"'
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}", " "),  # "***SALE***", "#SALE"
    (r"\s+\.\s+", " "),  # " . "
)

_WORD_JOINER = re.compile(r"(?:\-|\_)")  # more than 3 of them: this-is-my-cute-cat, this_is_my_cute_cat

_AFTER_FTFY = _steps(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),  # shop spam
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 1920x1080 (latin x, cyrillic х, ×)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),  # a space after punctuation glued to the next word
    (r"\s+", " "),
    # No strip before these anchored rules: the training code's `text.strip()` here discarded its
    # result (fixed upstream in March 2026, after the published checkpoints were trained), so a
    # leading or trailing space keeps them from matching. diffusers does the same.
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),  # one pair of enclosing quotes
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
)


def basic_clean(text: str) -> str:
    """Fix mojibake, unescape HTML (twice, for doubly escaped captions) and strip: the light cleaning."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_prompt(text: str) -> str:
    """The full cleaning PRX was trained with: lower-case, drop urls/handles/CJK/ids/file names/spam,
    normalise dashes and quotes, collapse punctuation and whitespace."""
    text = urllib.parse.unquote_plus(str(text)).strip().lower()
    for pattern, replacement in _BEFORE_FTFY:
        text = pattern.sub(replacement, text)
    if len(_WORD_JOINER.findall(text)) > 3:
        text = _WORD_JOINER.sub(" ", text)
    text = basic_clean(text)
    for pattern, replacement in _AFTER_FTFY:
        text = pattern.sub(replacement, text)
    return text.strip()
