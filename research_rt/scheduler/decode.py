"""Room for the next decode step: one new KV slot per running request, found by evicting cached
prefixes and, when that is not enough, retracting requests back to the queue.

`new_token_ratio` is how much of their remaining `max_new_tokens` running requests are expected to
still need (the prefill adder reserves that much room). It starts high, decays with every decode
step, and is reset by a retraction (the estimate was too optimistic).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from research_rt.core.req import Req
from research_rt.scheduler.cache import CacheManager
from research_rt.scheduler.stats import StepCounters

logger = logging.getLogger("research_rt.scheduler")

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.14
NEW_TOKEN_RATIO_DECAY = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / 600


class DecodeRoom:
    def __init__(
        self,
        cache: CacheManager,
        conservativeness: float,
        counters: StepCounters,
        retraction_key: Callable[[Req], Any] | None = None,
    ) -> None:
        self.cache = cache
        self.conservativeness = conservativeness
        self.counters = counters
        # the running request retracted first is the minimum: least progress (and, with priority
        # scheduling, least urgent first: priority.py)
        self.retraction_key = retraction_key or (lambda r: (len(r.output_ids), -len(r.input_ids)))
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO * conservativeness

    def decayed(self) -> None:
        """After a decode step: expect a little less of what remains."""
        self.new_token_ratio = max(self.new_token_ratio - NEW_TOKEN_RATIO_DECAY, MIN_NEW_TOKEN_RATIO)

    def can_fit(self, running: list[Req]) -> bool:
        """Whether every running request gets its next slot without a retraction."""
        return self.cache.room() >= len(running)

    def ensure(self, running: list[Req], waiting: list[Req]) -> Req | None:
        """Make one free slot per request of `running`, retracting (into `waiting`, in place) the
        requests that have made the least progress. Returns the last request if even it alone does
        not fit (it leaves `running`; the caller ends it)."""
        self.cache.evict_for(len(running))
        while self.cache.kv_pool.available_size() < len(running):
            if len(running) == 1:
                return running.pop()
            victim = min(running, key=self.retraction_key)
            running.remove(victim)
            self.retract(victim, waiting)
            self.cache.evict_for(len(running))
        return None

    def retract(self, req: Req, waiting: list[Req], reset_ratio: bool = True) -> None:
        """Move `req` (already out of `running`) to the front of `waiting`, handing its computed
        tokens to the prefix cache. A retraction for room resets `new_token_ratio` (the estimate
        was too optimistic); one for a pause or a preemption (`reset_ratio=False`) does not."""
        logger.info("Retract request %s (%d tokens computed) back to the queue", req.rid, req.kv_len)
        self.cache.cache_req(req, finished=True)
        self.counters.num_retractions += 1
        req.is_retracted = True
        waiting.insert(0, req)
        if reset_ratio:
            self.new_token_ratio = INIT_NEW_TOKEN_RATIO * self.conservativeness
