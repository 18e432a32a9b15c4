"""Prefixes shared inside one prefill step: a waiting request that would compute again what a request
of the same step computes (a prefix they share that the cache does not hold yet) waits a step and
takes it from the cache instead.

Requests sent together with one long prefix (a shared document or few-shot examples; W3 of
`make bench-peers`: 32 requests after one 1024-token prefix) otherwise compute it several times in
the first step they share: with 2048-token chunks W3's first step held request 0 and 992 tokens of
request 1's copy of the same prefix, and the next one the other 31 suffixes from that copy (1984
tokens); now 1056 and then 992 tokens, half as many (scheduler.py also caches a prompt as soon as its
prefill ends, not when its request finishes). SGLang's `lpm` policy moves such requests to the end of
the queue (its IN_BATCH_PREFIX_CACHING thresholds, 32 tokens), where they may still join the step;
here they leave the step, whatever the policy, when the shared part is at least MIN_SHARED tokens and
at least half of what they would compute. Outputs do not change: a request's tokens do not depend on
its batch or on where its prefix was computed.
"""

from __future__ import annotations

from collections.abc import Sequence

from research_rt.cache.radix_cache import common_prefix_len

MIN_SHARED = 32  # tokens; as SGLang's in-batch prefix caching thresholds


class StepPrefixes:
    """The token sequences the current prefill step computes and hands to the prefix cache, found
    by their first tokens past the cached prefix."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled  # False without a prefix cache: nothing to wait for
        self._by_key: dict[tuple[int, ...], list[Sequence[int]]] = {}

    def add(self, tokens: Sequence[int], cached: int) -> None:
        """A request of this step will compute `tokens` past its first `cached` (already cached)."""
        if self.enabled and len(tokens) >= cached + MIN_SHARED:
            self._by_key.setdefault(tuple(tokens[: cached + MIN_SHARED]), []).append(tokens)

    def should_wait(self, cacheable: Sequence[int], cached: int, extend: int) -> bool:
        """Whether a request whose first `cached` tokens of `cacheable` (what the cache may give it)
        are cached, and which would compute `extend` tokens, shares enough of them with this step."""
        if not self._by_key:
            return False
        mates = self._by_key.get(tuple(cacheable[: cached + MIN_SHARED]))
        if not mates:
            return False
        shared = max(common_prefix_len(cacheable, m) for m in mates) - cached
        return shared >= MIN_SHARED and 2 * shared >= extend
