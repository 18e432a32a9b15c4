"""The prefix cache that --disable-radix-cache uses: it never shares and keeps nothing."""

from __future__ import annotations

import torch

from research_rt.cache.kv_pool import KVPool
from research_rt.cache.no_prefix_cache import NoPrefixCache


def test_disabled_cache_never_shares():
    pool = KVPool(16, 1, 1, 1, torch.float32, "cpu")
    tree = NoPrefixCache(pool)
    slots = pool.alloc(4)
    assert slots is not None
    assert tree.insert([1, 2, 3, 4], slots) == 0
    assert tree.insert([1, 2, 3, 4], slots) == 0
    got, node = tree.match_prefix([1, 2, 3, 4])
    assert got.numel() == 0 and node is tree.root
    assert tree.total_size() == 0 and tree.evictable_size == 0
    assert tree.evict(10) == 0
    pool.free(slots)
    tree.check_integrity()
