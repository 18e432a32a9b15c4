"""Prompt-lookup drafts: continue the sequence the way it went after the last earlier occurrence
of its current suffix.

`NgramMatcher` keeps, per request, an index from every n-gram (n in [min_window, max_window]) to
the position just past its most recent occurrence. The index lags the sequence by one token, so a
lookup of the current suffix finds an *earlier* occurrence (never the suffix itself) and at least
one following token. Appending a token costs (max_window - min_window + 1) dictionary writes;
a lookup at most as many reads, longest window first.
"""

from __future__ import annotations


class NgramMatcher:
    def __init__(self, min_window: int, max_window: int) -> None:
        if not 1 <= min_window <= max_window:
            raise ValueError("need 1 <= min window <= max window")
        self.min_window = min_window
        self.max_window = max_window
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its last occurrence

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: list[int]) -> None:
        """Append tokens; n-grams ending before the new last token enter the index."""
        for tok in tokens:
            end = len(self.tokens)  # n-grams ending at `end` (exclusive) are indexed now: lag one
            seq = self.tokens
            for n in range(self.min_window, min(self.max_window, end) + 1):
                self.index[tuple(seq[end - n : end])] = end
            seq.append(tok)

    def sync(self, sequence: list[int]) -> None:
        """Catch up with `sequence` (the request's prompt + output, which only grows)."""
        if len(sequence) > len(self.tokens):
            self.extend(sequence[len(self.tokens) :])

    def draft(self, num_tokens: int) -> list[int]:
        """Up to `num_tokens` tokens that followed the most recent earlier occurrence of the
        longest matching suffix (max window down to min window); [] when none matches."""
        seq = self.tokens
        size = len(seq)
        for n in range(min(self.max_window, size - 1), self.min_window - 1, -1):
            end = self.index.get(tuple(seq[size - n :]))
            if end is not None:
                return seq[end : end + num_tokens]
        return []
