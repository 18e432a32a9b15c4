"""The scheduler loop for encoder embedding models: batch waiting requests, encode, answer.

It speaks the same inbox protocol as `Scheduler` (Req and Control messages, `run_forever`,
`on_output` with ReqOutput) so the Engine and the server drive both alike; it has no KV
bookkeeping (its `tree` is a disabled radix cache over the runner's one-slot placeholder pool).
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable

from research_rt.cache.radix_cache import RadixCache
from research_rt.engine.loop import SchedulerLoop
from research_rt.engine.req import FinishReason, Req, abort_reason
from research_rt.engine.scheduler import Control, ReqOutput
from research_rt.executor.encoder_runner import EncoderRunner

logger = logging.getLogger("research_rt.scheduler")


class EncoderScheduler(SchedulerLoop):
    def __init__(self, runner: EncoderRunner, args, on_output: Callable[[list[ReqOutput]], None]) -> None:
        self.runner = runner
        self.args = args
        self.on_output = on_output
        self.kv_pool = runner.kv_pool
        self.tree = RadixCache(self.kv_pool, disable=True)
        self.inbox: queue.Queue[Req | Control] = queue.Queue()
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None
        self.num_prefill_tokens = 0
        self.num_cached_tokens = 0
        self.last_gen_throughput = 0.0
        self.step_hooks: list[Callable[[EncoderScheduler], None]] = []

    def _fail_all(self, message: str) -> None:
        self._finish(self.waiting, abort_reason(message, 500, "InternalServerError"))
        self.waiting = []

    def step(self) -> bool:
        while True:
            try:
                self._handle(self.inbox.get_nowait())
            except queue.Empty:
                break
        if not self.waiting:
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
        self.num_prefill_tokens += sum(len(r.input_ids) for r in batch)
        logger.info(
            "Encode batch. #seq: %d, #token: %d, #queue-req: %d",
            len(batch),
            sum(len(r.input_ids) for r in batch),
            len(self.waiting),
        )
        self._finish(batch, FinishReason("length", length=0))
        for hook in self.step_hooks:
            hook(self)
        return True

    def is_idle(self) -> bool:
        return not self.waiting and not self.running

    def flush_cache(self) -> bool:
        return self.is_idle()

    def _handle(self, item: Req | Control) -> None:
        if isinstance(item, Req):
            self.waiting.append(item)
            return
        if item.kind in ("abort", "abort_all"):
            gone = [r for r in self.waiting if item.kind == "abort_all" or r.rid == item.rid]
            self.waiting = [r for r in self.waiting if r not in gone]
            self._finish(gone, FinishReason("abort", message="Abort requested"))
        elif item.kind == "flush_cache":
            item.result = self.flush_cache()
        elif item.kind == "call":
            assert item.fn is not None
            try:
                item.result = item.fn()
            except Exception as e:  # noqa: BLE001 - handed back to the caller
                item.result = e
        item.done.set()

    def _finish(self, reqs: list[Req], reason: FinishReason) -> None:
        for req in reqs:
            req.finished_reason = reason
        if reqs:
            self.on_output([ReqOutput(r, None, True) for r in reqs])
