"""frontend/tokenize_input.py and score_input.py helpers, with a recording fake tokenizer: which
`add_special_tokens` reaches the tokenizer, and the score arithmetic."""

from __future__ import annotations

import math

import pytest

from research_rt.core.errors import RequestError
from research_rt.frontend.score_input import ScoreInput, common_prefix, label_scores
from research_rt.frontend.tokenize_input import NO_TOKENIZER, detokenize, tokenize


class FakeTokenizer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append((text, add_special_tokens))
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, chat, tokenize: bool, add_generation_prompt: bool) -> str:
        assert tokenize is False
        return "".join(f"<{m['role']}>{m['content']}" for m in chat) + (
            "<gen>" if add_generation_prompt else ""
        )

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("" if (i == 1 and skip_special_tokens) else "<s>" if i == 1 else chr(i) for i in ids)


def test_add_special_tokens_defaults_and_overrides():
    tok = FakeTokenizer()
    assert tokenize(tok, "ab") == [1, 97, 98]  # a prompt: special tokens by default
    assert tokenize(tok, "ab", add_special_tokens=False) == [97, 98]
    chat = [{"role": "user", "content": "x"}]
    assert tokenize(tok, messages=chat) == [ord(c) for c in "<user>x<gen>"]  # a chat: none by default
    assert tokenize(tok, messages=chat, add_special_tokens=True)[0] == 1
    assert tokenize(tok, messages=chat, add_generation_prompt=False) == [ord(c) for c in "<user>x"]
    assert tok.calls[-1] == ("<user>x", False)


def test_detokenize_and_no_tokenizer():
    tok = FakeTokenizer()
    assert detokenize(tok, 200, [1, 104, 105]) == "hi"
    assert detokenize(tok, 200, [1, 104], skip_special_tokens=False) == "<s>h"
    for call in (lambda: tokenize(None, "a"), lambda: detokenize(None, 10, [1])):
        with pytest.raises(RequestError, match="without a tokenizer"):
            call()
    assert "skip_tokenizer_init" in NO_TOKENIZER


def test_score_prompts_and_arithmetic():
    text = ScoreInput("Q", ["a", "bc"], [5], item_first=False)
    text.validate(100)
    assert text.prompts(lambda t: [ord(c) for c in t]) == [[81, 97], [81, 98, 99]]
    ids = ScoreInput([7, 8], [[1], [2, 3]], [5], item_first=True)
    ids.validate(100)
    assert ids.prompts(None) == [[1, 7, 8], [2, 3, 7, 8]]
    single = ScoreInput("Q", "z", [5])
    single.validate(100)
    assert single.prompts(lambda t: list(t)) == [["Q", "z"]]
    logps = [(math.log(0.2), 5), (math.log(0.05), 6)]
    assert label_scores(logps, False) == pytest.approx([0.2, 0.05])
    assert label_scores(logps, True) == pytest.approx([0.8, 0.2])
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3], [1, 2, 9]]) == [1, 2]
    assert common_prefix([[4, 1], [5, 1]]) == []
