"""Radix (prefix) cache over token ids, owning the KV slots of cached prefixes.

Each node holds a run of token ids (`key`) and the KV slots (`value`) that store them. A node is
*protected* while some request holds a lock on it or on a descendant (`lock_ref > 0`), otherwise
*evictable*. Every slot of the KV pool is, at any moment, exactly one of:
  free (in the pool's free list) | evictable (in the tree, unlocked) | protected (in the tree,
  locked) | owned by a running request and not yet inserted into the tree.
When no request runs, the last kind is empty and `check_integrity` asserts
free + evictable + protected == total.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence

import torch

from research_rt.cache.kv_pool import KVPool


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, parent: TreeNode | None = None) -> None:
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key: list[int] = []
        self.value: torch.Tensor = torch.empty(0, dtype=torch.int64)
        self.lock_ref = 0
        self.last_access = time.monotonic()

    def __lt__(self, other: TreeNode) -> bool:
        return self.last_access < other.last_access


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b have in common."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    """Prefix cache that shares KV between requests (`PrefixCache`, prefix_cache.py)."""

    def __init__(self, kv_pool: KVPool) -> None:
        self.kv_pool = kv_pool
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode()
        self.root.lock_ref = 1
        self.evictable_size = 0
        self.protected_size = 0

    # ---------------------------------------------------------------- lookup
    def match_prefix(self, key: Sequence[int]) -> tuple[torch.Tensor, TreeNode]:
        """Longest cached prefix of `key`: (its slots, the deepest node covering it).

        A match that ends inside a node splits it, so the returned node covers the prefix exactly.
        """
        if not key:
            return torch.empty(0, dtype=torch.int64), self.root
        values: list[torch.Tensor] = []
        node = self.root
        now = time.monotonic()
        node.last_access = now
        while key:
            child = node.children.get(key[0])
            if child is None:
                break
            child.last_access = now
            n = common_prefix_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
                values.append(child.value)
                node = child
                break
            values.append(child.value)
            node = child
            key = key[n:]
        slots = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return slots, node

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Split `child` after `n` tokens; return the new upper node."""
        upper = TreeNode(child.parent)
        upper.key, upper.value = child.key[:n], child.value[:n]
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.children = {child.key[n]: child}
        assert child.parent is not None
        child.parent.children[upper.key[0]] = upper
        child.parent = upper
        child.key, child.value = child.key[n:], child.value[n:]
        return upper

    # ---------------------------------------------------------------- insert
    def insert(self, key: Sequence[int], value: torch.Tensor) -> int:
        """Insert `key` -> `value` slots. Returns how many leading tokens were already cached.

        The caller owns `value[:returned]` twice over (the tree keeps its own copies) and must
        free those duplicate slots; `value[returned:]` now belongs to the tree.
        """
        key = list(key)
        node = self.root
        node.last_access = time.monotonic()
        matched = 0
        while key:
            child = node.children.get(key[0])
            if child is None:
                new = TreeNode(node)
                new.key, new.value = key, value[matched:].clone()
                node.children[key[0]] = new
                self.evictable_size += len(key)
                break
            child.last_access = time.monotonic()
            n = common_prefix_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            matched += n
            key = key[n:]
            node = child
        return matched

    # ---------------------------------------------------------------- locks
    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 1:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            assert node.lock_ref > 0, "lock_ref underflow"
            node.lock_ref -= 1
            node = node.parent  # type: ignore[assignment]

    # ---------------------------------------------------------------- eviction
    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots from unlocked leaves, least recently used first."""
        if num_tokens <= 0:
            return 0
        leaves = [n for n in self._all_nodes() if not n.children and n.lock_ref == 0 and n is not self.root]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self.kv_pool.free(leaf.value)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    # ---------------------------------------------------------------- introspection
    def _all_nodes(self) -> list[TreeNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def total_size(self) -> int:
        return sum(len(n.key) for n in self._all_nodes())

    def check_integrity(self, expect_idle: bool = True) -> None:
        """Assert the counters agree with the tree; when idle, that no slot is lost."""
        nodes = self._all_nodes()
        evictable = sum(len(n.key) for n in nodes if n.lock_ref == 0)
        protected = sum(len(n.key) for n in nodes if n.lock_ref > 0 and n is not self.root)
        assert evictable == self.evictable_size, (evictable, self.evictable_size)
        assert protected == self.protected_size, (protected, self.protected_size)
        for n in nodes:
            assert len(n.key) == len(n.value), "key/value length mismatch"
            for child in n.children.values():
                assert child.parent is n
                assert n is self.root or n.lock_ref >= child.lock_ref, (
                    "a parent is locked less than its child"
                )
        if expect_idle:
            assert protected == 0, f"{protected} tokens still locked while idle"
            free = self.kv_pool.available_size()
            assert free + evictable == self.kv_pool.size, (
                f"KV slots leaked: free {free} + cached {evictable} != total {self.kv_pool.size}"
            )
            all_slots = torch.cat([self.kv_pool.free_slots] + [n.value for n in nodes])
            assert torch.unique(all_slots).numel() == all_slots.numel(), "a KV slot is owned twice"
