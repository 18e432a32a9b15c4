"""The Engine's `/tokenize` and `/detokenize` (frontend/tokenize_input.py has the rules): a mixin
of `Engine`. Both run on the caller's thread (the tokenizer only; the scheduler is not involved)."""

from __future__ import annotations

from typing import Any

from research_rt.frontend import tokenize_input


class TokenizeMixin:
    """Needs the Engine's `tokenizer`, `context_len` and `builder` (for the vocabulary size)."""

    def tokenize(
        self,
        prompt: str | list[str] | None = None,
        messages: list[dict[str, Any]] | None = None,
        add_special_tokens: bool | None = None,
        add_generation_prompt: bool | None = None,
    ) -> dict[str, Any]:
        """`{"tokens", "count", "max_model_len"}`: the ids (a list of id lists for a list of
        prompts), how many (a list likewise), and the model's context length."""
        tokens = tokenize_input.tokenize(
            self.tokenizer, prompt, messages, add_special_tokens, add_generation_prompt
        )
        count = [len(t) for t in tokens] if isinstance(prompt, list) else len(tokens)
        return {"tokens": tokens, "count": count, "max_model_len": self.context_len}

    def detokenize(
        self, tokens: list[int] | list[list[int]], skip_special_tokens: bool | None = None
    ) -> dict[str, Any]:
        """`{"text"}`: the decoded text (a list of texts for a list of id lists)."""
        text = tokenize_input.detokenize(self.tokenizer, self.builder.vocab_size, tokens, skip_special_tokens)
        return {"text": text}
