"""Incremental detokenization with UTF-8 hold-back and stop-string matching.

Each step decodes only a short window: `decode(ids[prefix:])` minus `decode(ids[prefix:read])`,
where `prefix..read` is the already-emitted context that fixes leading-space handling. Text ending
in the replacement character is an incomplete UTF-8 sequence and is held back until it completes.
"""

from __future__ import annotations

from typing import Any

CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.kwargs = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:
            self.kwargs["spaces_between_special_tokens"] = False
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.num_context = len(self.ids)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, **self.kwargs)
        except TypeError:  # tokenizers without spaces_between_special_tokens
            return self.tokenizer.decode(ids, skip_special_tokens=self.kwargs["skip_special_tokens"])

    def append(self, token_ids: list[int]) -> str:
        """Add tokens; return the text emitted so far (cumulative, held back at broken UTF-8)."""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self.text

    def final_text(self, output_ids: list[int]) -> str:
        """The exact decode of `output_ids` (with the prompt tail as context)."""
        ctx = self.ids[: self.num_context]
        full = self._decode(ctx + output_ids)
        return full[len(self._decode(ctx)) :]


def find_stop_string(text: str, stops: list[str], search_from: int) -> tuple[str, int] | None:
    """Earliest stop string occurring in text[search_from:] (or overlapping it): (string, index)."""
    best: tuple[str, int] | None = None
    for s in stops:
        idx = text.find(s, max(0, search_from - len(s) + 1))
        if idx != -1 and (best is None or idx < best[1]):
            best = (s, idx)
    return best
