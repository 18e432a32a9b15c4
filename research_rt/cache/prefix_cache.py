"""The interface the scheduler's cache manager uses: a prefix cache over token ids that owns KV slots.

Two implementations: `RadixCache` (shares prefixes between requests) and `NoPrefixCache`
(`--disable-radix-cache`: shares nothing, keeps nothing). The scheduler never asks which one it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch


class PrefixCache(Protocol):
    evictable_size: int  # cached tokens no request holds a lock on (freed first when the pool is short)
    protected_size: int  # cached tokens some running request holds a lock on

    def match_prefix(self, key: Sequence[int]) -> tuple[torch.Tensor, Any]:
        """(slots of the longest cached prefix of `key`, a node handle to lock it by)."""

    def insert(self, key: Sequence[int], value: torch.Tensor) -> int:
        """Hand `key`'s slots to the cache; return how many leading tokens it had already (the
        caller's duplicates of those are the caller's to free). Whatever the cache keeps shows up in
        the next `match_prefix(key)`; the rest stays the caller's."""

    def inc_lock_ref(self, node: Any) -> None: ...

    def dec_lock_ref(self, node: Any) -> None: ...

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` unlocked slots if it can; return how many it freed."""

    def reset(self) -> None: ...

    def total_size(self) -> int: ...

    def check_integrity(self, expect_idle: bool = True) -> None:
        """Assert the counters are right; when idle, that free + cached slots make the whole pool."""
