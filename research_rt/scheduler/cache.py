"""KV bookkeeping of running requests: which slots a request owns, and what it gives back.

KV ownership (radix_cache.py lists the four states of a slot):
- admission (`admit`) matches the longest cached prefix, locks its node and points the request's
  row at those slots (`cache_protected_len` of them); new slots come from the pool (`alloc_for`),
  evicting unlocked cache entries when the pool is short;
- after every prefill chunk, the last one too, `cache_req(req, finished=False)` hands the computed
  tokens to the prefix cache (so a retracted or chunked request resumes from there, and others
  share a prompt while it is still running, as SGLang's `cache_unfinished_req`) and moves the lock
  down to the new node;
- when a request finishes, is aborted or is retracted, `cache_req(req, finished=True)` hands its
  computed tokens over too. Slots the cache already had (computed twice by concurrent requests)
  are freed, and so are the slots the cache does not keep (all of them with a `NoPrefixCache`);
  the lock is released and the row freed.
A request whose interventions change activations (steer, ablate) is kept apart: it matched no
prefix at admission (prefill.py) and its computed tokens are never inserted; they are freed when
it finishes or is retracted.
"""

from __future__ import annotations

import logging

import torch

from research_rt.cache.kv_pool import KVPool, ReqToTokenPool
from research_rt.cache.prefix_cache import PrefixCache
from research_rt.core.req import Req

logger = logging.getLogger("research_rt.scheduler")


class CacheManager:
    def __init__(self, kv_pool: KVPool, req_to_token: ReqToTokenPool, tree: PrefixCache) -> None:
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.tree = tree

    def room(self) -> int:
        """Slots a new request could get now: free ones plus unlocked cached ones."""
        return self.kv_pool.available_size() + self.tree.evictable_size

    def num_used_tokens(self) -> int:
        """Slots held by requests (locked prefixes included), i.e. neither free nor evictable."""
        return self.kv_pool.size - self.kv_pool.available_size() - self.tree.evictable_size

    def admit(self, req: Req, prefix: torch.Tensor, node) -> None:
        """Lock the matched prefix (`prefix` slots under `node`) and give `req` a row pointing at it."""
        self.tree.inc_lock_ref(node)
        req.req_pool_row = self.req_to_token.alloc()  # type: ignore[assignment]
        req.last_node, req.cache_protected_len, req.kv_len = node, len(prefix), len(prefix)
        self.req_to_token.table[req.req_pool_row, : len(prefix)] = prefix

    def evict_for(self, n: int) -> None:
        """Evict unlocked cache entries until `n` slots are free (or nothing is left to evict)."""
        short = n - self.kv_pool.available_size()
        if short > 0:
            self.tree.evict(short)

    def alloc_for(self, req: Req, n: int) -> bool:
        """Give `req` n new slots at positions kv_len.. (evicting cached prefixes if needed)."""
        self.evict_for(n)
        slots = self.kv_pool.alloc(n)
        if slots is None:
            return False
        self.req_to_token.table[req.req_pool_row, req.kv_len : req.kv_len + n] = slots
        return True

    def alloc_decode_slots(self, reqs: list[Req]) -> None:
        """One new slot per request, at position kv_len of its row (the caller made room)."""
        slots = self.kv_pool.alloc(len(reqs))
        assert slots is not None
        rows = torch.tensor([r.req_pool_row for r in reqs])
        self.req_to_token.table[rows, torch.tensor([r.kv_len for r in reqs])] = slots

    def slots_of(self, req: Req, start: int, length: int) -> torch.Tensor:
        return self.req_to_token.table[req.req_pool_row, start : start + length]

    @staticmethod
    def keeps(req: Req) -> bool:
        """Whether `cache_req` hands `req`'s tokens to the prefix cache: not when its interventions
        change its KV (steer, ablate)."""
        return req.interventions is None or not req.interventions.changes_kv

    def cache_req(self, req: Req, finished: bool) -> None:
        """Hand `req`'s computed tokens to the prefix cache; see the module doc for what is freed."""
        row = req.req_pool_row
        if row < 0:
            return
        if not self.keeps(req):
            if finished:
                self.kv_pool.free(self.req_to_token.table[row, req.cache_protected_len : req.kv_len].clone())
                self._release(req)
            return
        tokens = req.fill_ids[: req.kv_len]
        slots = self.req_to_token.table[row, : req.kv_len].clone()
        already = self.tree.insert(tokens, slots)
        self.kv_pool.free(slots[req.cache_protected_len : already])
        kept, node = self.tree.match_prefix(tokens)
        if finished:
            self.kv_pool.free(slots[len(kept) :])
            self._release(req)
            return
        self.req_to_token.table[row, : len(kept)] = kept
        self.tree.dec_lock_ref(req.last_node)
        self.tree.inc_lock_ref(node)
        req.last_node, req.cache_protected_len = node, len(kept)

    def _release(self, req: Req) -> None:
        self.tree.dec_lock_ref(req.last_node)
        self.req_to_token.free(req.req_pool_row)
        req.req_pool_row, req.kv_len, req.cache_protected_len, req.last_node = -1, 0, 0, None

    def pool_whole(self) -> bool:
        """The integrity check for an idle scheduler: free + cached slots make the whole pool, none
        owned twice, nothing locked (logged when it fails)."""
        try:
            self.tree.check_integrity(expect_idle=True)
        except AssertionError as e:
            logger.error("KV pool integrity check failed: %s", e)
            return False
        return True

    def reset(self) -> None:
        """Forget everything (flush, or after a failed step): every slot and row free again."""
        self.tree.reset()
        self.kv_pool.clear()
        self.req_to_token.clear()
