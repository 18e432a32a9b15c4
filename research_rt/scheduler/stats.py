"""Scheduler statistics: the counters a scheduler keeps, the one snapshot every reader uses
(`/get_load`, `/get_server_info`, `/metrics`, the log lines), and SGLang's log lines."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger("research_rt.scheduler")


@dataclass
class StepCounters:
    """Running totals, owned by the scheduler thread."""

    num_prefill_tokens: int = 0  # tokens computed by prefill forwards
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_retractions: int = 0
    num_mixed_steps: int = 0  # prefill forwards that carried running decodes (mixed chunks)
    decode_steps: int = 0
    last_gen_throughput: float = 0.0  # decode tokens/s over the last log interval
    _window_tokens: int = 0
    _window_start: float = field(default_factory=time.monotonic)

    def decode_starts(self) -> None:
        if self._window_tokens == 0:  # throughput counts decoding time, not idle time
            self._window_start = time.monotonic()

    def decoded(self, num_tokens: int) -> None:
        self.decode_steps += 1
        self._window_tokens += num_tokens

    def close_window(self) -> None:
        now = time.monotonic()
        self.last_gen_throughput = self._window_tokens / max(now - self._window_start, 1e-9)
        self._window_tokens, self._window_start = 0, now


@dataclass(frozen=True)
class SchedulerStats:
    num_running_reqs: int  # running, plus the chunked request being prefilled
    num_queue_reqs: int
    num_used_tokens: int  # KV slots held by requests: neither free nor evictable cache
    num_free_tokens: int
    num_cached_tokens: int  # slots in the prefix cache (locked or not)
    max_total_num_tokens: int
    cache_hit_rate: float
    last_gen_throughput: float
    num_waiting_tokens: int = 0  # prompt tokens of the queued requests
    kv_pool_whole: bool | None = None  # integrity check when idle; None while busy or not checked

    @property
    def token_usage(self) -> float:
        return self.num_used_tokens / self.max_total_num_tokens if self.max_total_num_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "token_usage": self.token_usage}


def snapshot(
    cache: Any, num_running: int, waiting: list[Any], counters: StepCounters, whole: bool | None
) -> SchedulerStats:
    """A decoder scheduler's figures from its CacheManager (`cache`) and counters."""
    pool, tree = cache.kv_pool, cache.tree
    return SchedulerStats(
        num_running_reqs=num_running,
        num_queue_reqs=len(waiting),
        num_waiting_tokens=sum(len(r.input_ids) for r in waiting),
        num_used_tokens=cache.num_used_tokens(),
        num_free_tokens=pool.available_size(),
        num_cached_tokens=tree.evictable_size + tree.protected_size,
        max_total_num_tokens=pool.size,
        cache_hit_rate=hit_rate(counters),
        last_gen_throughput=counters.last_gen_throughput,
        kv_pool_whole=whole,
    )


def hit_rate(counters: StepCounters) -> float:
    seen = counters.num_prefill_tokens + counters.num_cached_tokens
    return counters.num_cached_tokens / seen if seen else 0.0


def log_prefill(stats: SchedulerStats, num_seqs: int, new_tokens: int, cached_tokens: int) -> None:
    logger.info(
        "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
        "#running-req: %d, #queue-req: %d",
        num_seqs,
        new_tokens,
        cached_tokens,
        stats.token_usage,
        stats.num_running_reqs,
        stats.num_queue_reqs,
    )


def log_decode(stats: SchedulerStats) -> None:
    logger.info(
        "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): %.2f, "
        "#queue-req: %d",
        stats.num_running_reqs,
        stats.num_used_tokens,
        stats.token_usage,
        stats.last_gen_throughput,
        stats.num_queue_reqs,
    )
