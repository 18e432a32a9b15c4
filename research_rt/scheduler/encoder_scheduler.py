"""The scheduler for encoder embedding models: batch waiting requests, encode, answer.

It reads the same messages as `Scheduler` (loop.py) and reports the same `ReqOutput` snapshots
and `SchedulerStats`, so the Engine drives both alike. Encoders keep no KV cache: every request
runs whole in one padded batch, so there is nothing to cache, chunk or retract.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from research_rt.core.messages import ReqOutput
from research_rt.core.req import FinishReason, Req, abort_reason
from research_rt.executor.encoder_runner import EncoderRunner
from research_rt.scheduler.loop import SchedulerLoop
from research_rt.scheduler.stats import SchedulerStats, StepCounters

logger = logging.getLogger("research_rt.scheduler")


class EncoderScheduler(SchedulerLoop):
    def __init__(self, runner: EncoderRunner, args, on_output: Callable[[list[ReqOutput]], None]) -> None:
        super().__init__()
        self.runner = runner
        self.args = args
        self.on_output = on_output
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.counters = StepCounters()

    def step(self) -> bool:
        self.drain_inbox()
        if not self.waiting or self.paused:
            return False
        # take requests in order while the padded batch fits the token budget
        batch: list[Req] = []
        width = 0
        for req in self.waiting:
            w = max(width, len(req.input_ids))
            if batch and (
                w * (len(batch) + 1) > self.runner.max_batch_tokens
                or len(batch) >= self.runner.max_running_requests
            ):
                break
            batch.append(req)
            width = w
        self.waiting = self.waiting[len(batch) :]
        self.running = batch
        try:
            vectors = self.runner.encode([r.input_ids for r in batch])
        finally:
            self.running = []
        for req, vec in zip(batch, vectors):
            req.embedding = vec
        self.counters.num_prefill_tokens += sum(len(r.input_ids) for r in batch)
        logger.info(
            "Encode batch. #seq: %d, #token: %d, #queue-req: %d",
            len(batch),
            sum(len(r.input_ids) for r in batch),
            len(self.waiting),
        )
        self._finish(batch, FinishReason("length", length=0))
        self.run_step_hooks()
        return True

    def is_idle(self) -> bool:
        return not self.waiting and not self.running

    def add_request(self, req: Req) -> None:
        self.waiting.append(req)

    def abort(self, rid: str | None) -> None:
        gone = [r for r in self.waiting if rid is None or r.rid == rid]
        self.waiting = [r for r in self.waiting if r not in gone]
        self._finish(gone, FinishReason("abort", message="Abort requested"))

    def flush_cache(self) -> bool:
        return self.is_idle()  # nothing is cached; "flushed" when nothing is pending, as for decoders

    def retract_running(self) -> None:
        pass  # between steps nothing runs: requests are queued or done

    def reap_aborted(self) -> None:
        pass  # `abort` ends queued requests at once

    def fail_all(self, message: str) -> None:
        self._finish(self.waiting, abort_reason(message, 500, "InternalServerError"))
        self.waiting = []

    def _finish(self, reqs: list[Req], reason: FinishReason) -> None:
        for req in reqs:
            req.finished_reason = reason
        if reqs:
            self.on_output([ReqOutput.of(r, None) for r in reqs])

    def stats(self, check_pool: bool = False) -> SchedulerStats:
        """No KV pool: the token figures describe the batch budget, all of it free when idle."""
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_queue_reqs=len(self.waiting),
            num_used_tokens=0,
            num_free_tokens=self.runner.max_total_num_tokens,
            num_cached_tokens=0,
            max_total_num_tokens=self.runner.max_total_num_tokens,
            cache_hit_rate=0.0,
            last_gen_throughput=0.0,
            kv_pool_whole=True if check_pool and self.is_idle() else None,
        )
