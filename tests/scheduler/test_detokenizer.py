"""IncrementalDetokenizer with the real SmolLM2 tokenizer, and find_stop_string."""

from __future__ import annotations

import pytest

from research_rt.scheduler.detokenizer import IncrementalDetokenizer, find_stop_string

TEXTS = [
    "Hello, world! How are you today?",
    "Grüße aus Köln – naïve café, señor.",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Emoji: 🤖🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 done",
    "Ελληνικά и русский текст, עברית, العربية, हिन्दी.",
    "  leading spaces\n\tand\ttabs\n\nnew lines   ",
    "mixed 😀 中 é 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ end",
]


@pytest.fixture(scope="module")
def tok(smollm_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_tokenizer_dir))


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_matches_full_decode(tok, text):
    prompt = tok.encode("The answer is:")
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt)
    full = tok.decode(ids, skip_special_tokens=True)
    emitted = ""
    for i, t in enumerate(ids):
        out = detok.append([t])
        assert "\ufffd" not in out, (i, out)
        assert out.startswith(emitted), "emitted text was rewritten"
        assert full.startswith(out), (out, full)
        emitted = out
    assert emitted == full
    assert detok.final_text(ids) == full


def test_multibyte_tokens_are_held_back(tok):
    # at least one emoji must span several byte-level tokens, otherwise the test proves nothing
    text = "🤖👨‍👩‍👧‍👦"
    ids = tok.encode(text)
    partial = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    assert any(p.endswith("\ufffd") for p in partial)
    detok = IncrementalDetokenizer(tok, [])
    outs = [detok.append([t]) for t in ids]
    assert all("\ufffd" not in o for o in outs)
    assert outs[-1] == text
    # while a partial decode ends in a broken sequence, nothing new is emitted yet
    for i, p in enumerate(partial):
        if p.endswith("\ufffd"):
            assert len(outs[i]) <= len(p) - 1


def test_append_several_tokens_at_once(tok):
    text = TEXTS[3] + " " + TEXTS[2]
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("Q:"))
    out = ""
    for i in range(0, len(ids), 3):
        out = detok.append(ids[i : i + 3])
        assert "\ufffd" not in out
    assert out == tok.decode(ids)


def test_special_tokens_skipped(tok):
    eos = tok.eos_token_id
    ids = tok.encode("Hi there") + [eos]
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    for t in ids:
        out = detok.append([t])
    assert out == "Hi there"
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    for t in ids:
        out = detok.append([t])
    assert out == "Hi there" + tok.eos_token


def test_stop_string_spanning_tokens(tok):
    text = "The password is swordfish, then more text."
    ids = tok.encode(text)
    stop = "swordfish"
    detok = IncrementalDetokenizer(tok, [])
    hit_at = None
    for i, t in enumerate(ids):
        before = len(detok.text)
        out = detok.append([t])
        hit = find_stop_string(out, [stop, "zzz"], before)
        if hit is not None:
            hit_at = i
            assert hit == (stop, text.index(stop))
            break
    assert hit_at is not None
    # found as soon as the text contains it, not later
    assert stop not in tok.decode(ids[:hit_at]) and stop in tok.decode(ids[: hit_at + 1])
    # the stop string is really cut across tokens here
    assert not any(stop in tok.decode([t]) for t in ids)


def test_find_stop_string_basics():
    assert find_stop_string("hello world", ["world"], 0) == ("world", 6)
    assert find_stop_string("hello world", ["xyz"], 0) is None
    assert find_stop_string("", ["a"], 0) is None
    # earliest wins, not the first listed
    assert find_stop_string("abc STOP def END", ["END", "STOP"], 0) == ("STOP", 4)
    # overlapping stops: earliest start index
    assert find_stop_string("xxabcd", ["bcd", "abc"], 0) == ("abc", 2)


def test_find_stop_string_search_from():
    text = "aaa STOP bbb"
    # new text starts at index 6 ("OP bbb"): the stop string overlaps it and must be found
    assert find_stop_string(text, ["STOP"], 6) == ("STOP", 4)
    assert find_stop_string(text, ["STOP"], 7) == ("STOP", 4)  # only its last char is new
    # entirely before the new text: already checked in an earlier step
    assert find_stop_string(text, ["STOP"], 8) is None
    assert find_stop_string("ab STOP cd STOP", ["STOP"], 9) == ("STOP", 11)
    assert find_stop_string("héllo 🤖 wörld", ["🤖 w"], 7) == ("🤖 w", 6)
