"""The prefill adder: which waiting requests (or chunks of them) the next prefill step computes.

Budgets for one step:
- tokens to compute: `chunked_prefill_size` (a request larger than what is left is cut, and the
  rest carried to the next step as the single "chunked" request) and `max_prefill_tokens`;
- KV room: free + evictable slots, minus what running requests are still expected to need for
  decoding (remaining max_new_tokens x `new_token_ratio`, which decays while nothing is retracted);
- `max_running_requests` and free rows of the request table.
Admitting a request matches its longest cached prefix and locks it (cache.py); one that would
compute again most of what a request of the same step computes waits a step for the cache
(in_step_prefix.py). With
`--enable-priority-scheduling` the queue is taken most urgent first, and a request that does not
fit may preempt less urgent running ones (priority.py has the rule).
A request that steers or ablates matches nothing (its KV differs from a plain run's, and cache.py
never inserts it); one that captures matches at most up to its first captured position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from research_rt.cache.prefix_cache import PrefixCache
from research_rt.core.req import Req
from research_rt.scheduler.cache import CacheManager
from research_rt.scheduler.in_step_prefix import StepPrefixes
from research_rt.scheduler.priority import Preemptor, PriorityPolicy
from research_rt.scheduler.stats import StepCounters

DECODE_CLIP = 4096  # cap on the decode room reserved per request


@dataclass
class PrefillItem:
    req: Req
    start: int  # first token of fill_ids computed in this step (== cached prefix length)
    length: int  # tokens computed in this step
    is_last_chunk: bool


def order_waiting(
    waiting: list[Req], policy: str, tree: PrefixCache, priority: PriorityPolicy | None = None
) -> list[Req]:
    """The order the adder considers waiting requests in: `--schedule-policy`, then (when enabled)
    by priority, most urgent first (a stable sort: the policy orders equal priorities)."""
    if policy == "lpm" and len(waiting) > 1:
        lens = {id(r): len(tree.match_prefix(r.fill_ids[:-1])[0]) for r in waiting}
        out = sorted(waiting, key=lambda r: -lens[id(r)])
    elif policy == "random":
        out = list(waiting)
        random.shuffle(out)
    else:
        out = list(waiting)
    return priority.order(out) if priority is not None else out


def reserve_of(req: Req, ratio: float) -> float:
    """The decode room set aside for a running request: its expected remaining tokens."""
    return min(req.max_new_tokens - len(req.output_ids), DECODE_CLIP) * ratio


def decode_reserve(running: list[Req], ratio: float) -> int:
    return int(sum(reserve_of(r, ratio) for r in running))


def max_prefix_len(req: Req) -> int:
    """How much of fill_ids may come from the cache: all but one token, and, when input logprobs
    are wanted, nothing past logprob_start_len, and with interventions what their spec allows
    (positions to capture must be computed; a steered prefix must not come from a plain run)."""
    n = req.seq_len - 1
    if req.return_logprob and not req.is_retracted:
        n = min(n, max(req.logprob_start_len, 0))
    limit = req.interventions.max_cached_prefix() if req.interventions is not None else None
    if limit is not None:
        n = min(n, limit)
    return max(n, 0)


class PrefillAdder:
    def __init__(
        self,
        cache: CacheManager,
        args,
        max_running: int,
        counters: StepCounters,
        preemptor: Preemptor | None = None,
    ) -> None:
        self.cache = cache
        self.policy = args.schedule_policy
        self.preemptor = preemptor  # None: no priority scheduling
        self.priority = preemptor.policy if preemptor is not None else None
        self.max_prefill_tokens = args.max_prefill_tokens
        size = args.chunked_prefill_size
        self.chunk_size = size if size and size > 0 else 1 << 30
        self.max_running = max_running
        self.counters = counters
        self.share_in_step = not args.disable_radix_cache

    def schedule(
        self, waiting: list[Req], running: list[Req], chunked: Req | None, new_token_ratio: float
    ) -> tuple[list[PrefillItem], Req | None]:
        """(the step's items, the request left chunked after it). Admitted requests leave `waiting`."""
        items: list[PrefillItem] = []
        step = StepPrefixes(self.share_in_step)
        rem_chunk = min(self.chunk_size, self.max_prefill_tokens)
        if chunked is not None:
            self._add_to_step(step, chunked, chunked.kv_len)
            length = min(chunked.seq_len - chunked.kv_len, rem_chunk)
            if not self.cache.alloc_for(chunked, length):
                # running decodes hold the pool; they finish or retract, then this resumes
                return items, chunked
            items.append(
                PrefillItem(chunked, chunked.kv_len, length, chunked.kv_len + length == chunked.seq_len)
            )
            rem_chunk -= length
            if not items[-1].is_last_chunk:
                return items, chunked
        if not waiting or rem_chunk <= 0:
            return items, None
        room = self.cache.room() - decode_reserve(running, new_token_ratio)

        def has_row() -> bool:
            return (
                len(running) + len(items) < self.max_running and self.cache.req_to_token.available_size() > 0
            )

        for req in order_waiting(waiting, self.policy, self.cache.tree, self.priority):
            if rem_chunk <= 0 or (self.preemptor is None and not has_row()):
                break
            cacheable = req.fill_ids[: max_prefix_len(req)]
            prefix, node = self.cache.tree.match_prefix(cacheable)
            extend = req.seq_len - len(prefix)
            if step.should_wait(cacheable, len(prefix), extend):
                continue  # the next step finds the shared part in the cache
            need = extend + reserve_of(req, new_token_ratio)

            def fits(room: float, need: float = need) -> bool:
                return has_row() and (room >= need or not (running or items))

            if not fits(room):
                if self.preemptor is None:
                    break
                freed = self.preemptor.make_room(
                    req, need, room, fits, running, waiting, lambda r: reserve_of(r, new_token_ratio)
                )
                if freed is None:
                    break
                room = freed
                # retracting inserted the victims' tokens into the cache (nodes may have split): match again
                prefix, node = self.cache.tree.match_prefix(req.fill_ids[: max_prefix_len(req)])
                extend = req.seq_len - len(prefix)
            length = min(extend, rem_chunk)
            self.cache.admit(req, prefix, node)
            # the lock moved slots from evictable to protected: they no longer count as room
            room -= len(prefix)
            if not req.is_retracted:
                req.cached_tokens = len(prefix)
                self.counters.num_cached_tokens += len(prefix)
            if not self.cache.alloc_for(req, length):
                self.cache.cache_req(req, finished=True)
                break
            waiting.remove(req)
            room -= need
            rem_chunk -= length
            items.append(PrefillItem(req, len(prefix), length, length == extend))
            self._add_to_step(step, req, len(prefix))
            if length < extend:
                return items, req
        return items, None

    def _add_to_step(self, step: StepPrefixes, req: Req, cached: int) -> None:
        if self.cache.keeps(req):
            step.add(req.fill_ids, cached)


def logit_rows(items: list[PrefillItem]) -> tuple[list[int], list[tuple[int, list[int], int | None]]]:
    """Rows of the flat prefill tokens whose logits are needed: input-logprob positions, and the
    last token of a finished prefill. Returns (rows, per item: (first row, logprob positions, sample position))."""
    rows: list[int] = []
    plan = []
    offset = 0
    for it in items:
        req = it.req
        lp_rows: list[int] = []
        if req.return_logprob and not req.is_retracted:
            lo = max(req.logprob_start_len, it.start)
            hi = min(it.start + it.length, len(req.input_ids) - 1)
            lp_rows = list(range(lo, hi))
        sample_row = it.start + it.length - 1 if it.is_last_chunk else None
        plan.append((len(rows), lp_rows, sample_row))
        rows.extend(offset + p - it.start for p in lp_rows)
        if sample_row is not None:
            rows.append(offset + sample_row - it.start)
        offset += it.length
    return rows, plan
