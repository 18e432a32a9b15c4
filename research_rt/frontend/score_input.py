"""`/v1/score` (SGLang 0.5's decoder-only scoring): how likely each label token is to come next
after query + item, for every item.

Input: `query` and `items` both text (a string, and a string or a list of strings: each prompt is
the text `query + item` tokenized whole) or both token ids (a list of ids, and a list of such
lists: each prompt is the concatenation); `item_first` puts the item before the query;
`label_token_ids` the tokens to score; `apply_softmax` normalises each item's scores over the
labels (otherwise each is the label's probability under the full vocabulary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from research_rt.core.errors import RequestError

MIXED_TYPES = (
    "Fields 'query' and 'items' must both be text (a string, and a string or a list of strings) "
    "or both token ids (a list of ids, and a list of such lists)."
)


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ids(x: Any) -> bool:
    return isinstance(x, list) and all(_is_id(t) for t in x)


@dataclass
class ScoreInput:
    query: str | list[int] | None = None
    items: str | list[str] | list[list[int]] | None = None
    label_token_ids: list[int] | None = None
    apply_softmax: bool = False
    item_first: bool = False

    def validate(self, vocab_size: int) -> None:
        for name in ("apply_softmax", "item_first"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"Field '{name}' must be a boolean.")
        labels = self.label_token_ids
        if not _ids(labels) or not labels:
            raise RequestError("Field 'label_token_ids' must be a non-empty list of token ids.")
        _check_vocab(labels, vocab_size, "label_token_ids")
        if self.query is None:
            raise RequestError("Field 'query' is required (a string or a list of token ids).")
        if self.items is None or self.items == []:
            raise RequestError("Field 'items' is required and must not be empty.")
        if isinstance(self.query, str):
            items = [self.items] if isinstance(self.items, str) else self.items
            if not (isinstance(items, list) and all(isinstance(i, str) for i in items)):
                raise RequestError(MIXED_TYPES)
        elif _ids(self.query):
            if not (isinstance(self.items, list) and all(_ids(i) for i in self.items)):
                raise RequestError(MIXED_TYPES)
            _check_vocab(self.query, vocab_size, "query")
            for k, item in enumerate(self.items):
                _check_vocab(item, vocab_size, f"items[{k}]")
        else:
            raise RequestError("Field 'query' must be a string or a list of token ids.")

    def prompts(self, tokenize: Any) -> list[list[int]]:
        """One prompt per item, as token ids (`tokenize(text)` for text; call `validate` first)."""
        if isinstance(self.query, str):
            items = [self.items] if isinstance(self.items, str) else self.items
            texts = [f"{i}{self.query}" if self.item_first else f"{self.query}{i}" for i in items]
            return [tokenize(t) for t in texts]
        return [
            list(i) + list(self.query) if self.item_first else list(self.query) + list(i) for i in self.items
        ]


def _check_vocab(ids: list[int], vocab_size: int, field: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"Field '{field}' has token id {bad}, outside the vocabulary (size {vocab_size}).")


def label_scores(logprobs: list[tuple[float, int]], apply_softmax: bool) -> list[float]:
    """Scores in label order from the next-token logprobs of the labels."""
    values = [lp for lp, _ in logprobs]
    if not apply_softmax:
        return [math.exp(v) for v in values]
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def common_prefix(prompts: list[list[int]]) -> list[int]:
    """The longest token prefix all prompts share (the query's, for query-first scoring)."""
    first = prompts[0]
    n = len(first)
    for p in prompts[1:]:
        n = min(n, len(p))
        n = next((k for k in range(n) if p[k] != first[k]), n)
    return first[:n]
