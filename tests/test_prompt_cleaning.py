"""Prompt cleaning equals diffusers' PRX `TextPreprocessor` where diffusers is right, and Photoroom's
training code (Photoroom/PRX `models/text_tower.py`) where it is not: curly quotes."""

import random

import pytest
from diffusers.pipelines.prx.pipeline_prx import TextPreprocessor

from mirage.prompt_cleaning import basic_clean, clean_prompt

CURLY_QUOTES = "“”‘’"

NASTY = [
    "A Photo of a CAT",
    "  Check https://example.com/page?id=3 and www.test.org or shop.example.co.uk/path today  ",
    "photo by @photographer_123 for @nyt",
    "東京の夜景 with 猫 and ㇰ ㈱ ㌀ 㐀 ䷀ characters",
    "em—dash en–dash ‒ figure ― bar ﹘ small －fullwidth a---b",
    "`backtick´ «guillemets» ¨diaeresis",
    "AT&amp;T &quot;quoted&quot &amp; more &lt;b&gt;bold&lt;/b&gt; &amp;lt;double&amp;gt;",
    "server 192.168.1.1 down",
    "article 1:23   ",
    "line one\\nline two",
    "#123 #12345678 1234567 tag #1",
    "see IMG_1234.JPG and file-name.webp or doc.pdf",
    '"""AUSVERKAUFT""" ***SALE*** #SALE ...wait... ok . done',
    "this-is-my-cute-cat and_more_words_here",
    "a-b-c",
    "mojibake: schÃ¶n cafÃ©",
    "jc6640 jc6640vc 6640vc231 j2d1a2a3 1920x1080 2.5×3.5 4х5",
    "worldwide free shipping! free download free; click for details, click on me",
    "png images jpg image page 12 of 30",
    "title : subtitle,next.word/other",
    "'leading quote",
    "trailing plus+",
    ".hidden",
    '"whole prompt quoted"',
    'free shipping "big sale"',  # a space left before the quotes after ftfy keeps them (see below)
    "%E2%9C%A8 sparkle+plus%20space",
    "<person> walking a dog",
    "",
    "   ",
    "\t\nwhite\u3000space\u00a0everywhere\n",
    "emoji 😀🎨 and ǅ ß İ ﬁ",
    "\x00null\x7fdel\u200bzero-width",
    "a (b) [c] {d} |e| \\f/ *g* ~h~ §i ¿j? ¡k! ©l ®m ™n •o ·p ½q",
    # where a rule's exact form shows: the shortest hashtag removed (5 digits); full-width underscores, which ftfy
    # turns into "_" only after the split of > 3 joiners has looked; an IP address inside a word (becomes a space)
    "tag #12345 here",
    "a＿b＿c＿d＿e",
    "a1.2.3.4b",
    # each at the edge of a rule: 3 joiners (kept), 6 digits, 2 dots, the last top-level domain listed, doubly
    # escaped HTML beside a "<" (which stops ftfy's own unescaping, so both html.unescape passes show)
    "a-b-c-d",
    "order 123456 shipped",
    "wait.. ok",
    "shop at example.it today",
    "1 < 2 &amp;quot;ok&amp;quot;",
]


@pytest.fixture(scope="module")
def reference():
    return TextPreprocessor()


@pytest.mark.parametrize("prompt", NASTY)
def test_equal_to_diffusers_without_curly_quotes(reference, prompt):
    assert not set(prompt) & set(CURLY_QUOTES)
    assert clean_prompt(prompt) == reference.clean_text(prompt)
    assert basic_clean(prompt) == reference.basic_clean(prompt)


def test_the_table_exercises_the_rules():
    cleaned = [clean_prompt(p) for p in NASTY]
    assert cleaned[0] == "a photo of a cat"
    assert cleaned[2] == "photo by for"  # handles gone
    assert cleaned[4] == "em dash en dash figure bar small fullwidth a b"  # dashes unified, then > 3 joiners split
    assert cleaned[12] == '"ausverkauft" sale sale wait ok done'
    assert cleaned[23] == "whole prompt quoted"  # one pair of enclosing quotes dropped
    # No strip before the enclosing-quotes rule (the training code discarded its `strip()`): the
    # space left where "free shipping" was removed keeps the quotes.
    assert cleaned[24] == '"big sale"'
    assert basic_clean(NASTY[15]) == "mojibake: schön café"
    assert basic_clean(NASTY[6]) == 'AT&T "quoted" & more <b>bold</b> <double>'
    assert cleaned[-5:-1] == ["a-b-c-d", "order shipped", "wait ok", "shop at today"]  # > 3 joiners are split
    assert basic_clean(NASTY[-1]) == '1 < 2 "ok"'


# Expected strings follow the training code's rules by hand: lower-case; “ ” -> " and ‘ ’ -> ';
# then a run of two or more quote characters becomes one ".
CURLY = [
    ("buy ‘‘SALE’’ now", 'buy "sale" now', "buy ''sale'' now"),
    ("“““WOW””” big deal", '"wow" big deal', '"""wow""" big deal'),
    ("a ‘’ b", 'a " b', "a '' b"),
    ("the “best” ‘‘cat’’ ever", 'the "best" "cat" ever', "the \"best\" ''cat'' ever"),
    ("She said ‘hi’ and “bye”", "she said 'hi' and \"bye\"", "she said 'hi' and \"bye\""),
    # alone, ‘‘SALE’’ -> "sale" loses its enclosing quotes too: both agree by accident
    ("‘‘SALE’’", "sale", "sale"),
]


@pytest.mark.parametrize("prompt, trained, diffusers", CURLY)
def test_curly_quotes_as_trained(reference, prompt, trained, diffusers):
    assert clean_prompt(prompt) == trained
    assert reference.clean_text(prompt) == diffusers  # where diffusers' lost quote classes show


def test_random_unicode_never_raises_and_matches_diffusers(reference):
    rng = random.Random(0)
    code_points = [range(0x20, 0x3000), range(0x3000, 0xA000), range(0x110000)]
    for _ in range(1500):
        text = "".join(chr(rng.choice(rng.choice(code_points))) for _ in range(rng.randint(0, 40)))
        cleaned, light = clean_prompt(text), basic_clean(text)
        assert isinstance(cleaned, str) and isinstance(light, str)
        plain = text.translate({ord(q): None for q in CURLY_QUOTES})
        assert clean_prompt(plain) == reference.clean_text(plain), repr(plain)
        assert light == reference.basic_clean(text)
