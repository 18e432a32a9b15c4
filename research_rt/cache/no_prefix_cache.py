"""A prefix cache that never shares (`--disable-radix-cache`): it matches nothing and keeps nothing,
so every request computes its whole prompt and frees all its slots when it ends."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from research_rt.cache.kv_pool import KVPool


class NoPrefixCache:
    """`PrefixCache` (prefix_cache.py) with nothing in it; `root` is the handle every match returns."""

    root = None
    evictable_size = 0
    protected_size = 0

    def __init__(self, kv_pool: KVPool) -> None:
        self.kv_pool = kv_pool

    def match_prefix(self, key: Sequence[int]) -> tuple[torch.Tensor, None]:
        return torch.empty(0, dtype=torch.int64), None

    def insert(self, key: Sequence[int], value: torch.Tensor) -> int:
        return 0

    def inc_lock_ref(self, node: None) -> None:
        pass

    def dec_lock_ref(self, node: None) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def reset(self) -> None:
        pass

    def total_size(self) -> int:
        return 0

    def check_integrity(self, expect_idle: bool = True) -> None:
        if expect_idle:
            free = self.kv_pool.available_size()
            assert free == self.kv_pool.size, f"KV slots leaked: free {free} != total {self.kv_pool.size}"
            slots = self.kv_pool.free_slots
            assert torch.unique(slots).numel() == slots.numel(), "a KV slot is free twice"
