"""The decoder scheduler: continuous batching with chunked prefill over a prefix cache.

One `step()` runs at most one forward: a prefill (EXTEND) batch when requests can be admitted or
a chunked request continues (prefill.py), otherwise a decode of every running request (room made
by decode.py). KV bookkeeping lives in cache.py, what happens after sampling in output.py, the
counters and log lines in stats.py. The offline Engine and the HTTP server drive the same loop
(loop.py) on a background thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from research_rt.cache.no_prefix_cache import NoPrefixCache
from research_rt.cache.radix_cache import RadixCache
from research_rt.core.forward_batch import ForwardMode
from research_rt.core.messages import ReqOutput
from research_rt.core.req import FinishReason, Req, abort_reason
from research_rt.executor.model_runner import ModelRunner, StepInput
from research_rt.sampling.sampler import Sampler
from research_rt.scheduler.cache import CacheManager
from research_rt.scheduler.decode import DecodeRoom
from research_rt.scheduler.loop import SchedulerLoop
from research_rt.scheduler.output import OutputProcessor, record_prefill
from research_rt.scheduler.pause import PauseMixin
from research_rt.scheduler.prefill import PrefillAdder, PrefillItem, logit_rows
from research_rt.scheduler.priority import PriorityPolicy
from research_rt.scheduler.speculative import SpeculativeDecoder
from research_rt.scheduler.stats import SchedulerStats, StepCounters, log_decode, log_prefill, snapshot

logger = logging.getLogger("research_rt.scheduler")


class Scheduler(PauseMixin, SchedulerLoop):
    def __init__(
        self, runner: ModelRunner, tokenizer: Any, args, on_output: Callable[[list[ReqOutput]], None]
    ) -> None:
        super().__init__()
        self.runner = runner
        self.args = args
        tree = NoPrefixCache(runner.kv_pool) if args.disable_radix_cache else RadixCache(runner.kv_pool)
        self.cache = CacheManager(runner.kv_pool, runner.req_to_token, tree)
        self.max_running = runner.max_running_requests
        self.counters = StepCounters()
        priority = PriorityPolicy(args)
        self.decode_room = DecodeRoom(
            self.cache, args.schedule_conservativeness, self.counters, priority.retraction_key
        )
        preemptor = priority.preemptor(self.cache, self.decode_room)
        self.adder = PrefillAdder(self.cache, args, self.max_running, self.counters, preemptor)
        self.output = OutputProcessor(tokenizer, on_output)
        self.sampler = Sampler()
        self.speculative = (
            SpeculativeDecoder(runner, self.cache, self.output, self.sampler, args)
            if args.speculative_algorithm
            else None
        )
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None

    def step(self) -> bool:
        self.drain_inbox()
        if self.paused:  # pause.py: no forward; aborts still end now
            self.reap_aborted()
            return False
        prefill = self._schedule_prefill()
        if prefill:
            mix = self.args.enable_mixed_chunk and self.running and self.decode_room.can_fit(self.running)
            self._run_prefill(prefill, self._prepare_decode() if mix else [])
            return True
        if self.running:
            self._run_decode()
            return True
        return False

    def is_idle(self) -> bool:
        return not self.waiting and not self.running and self.chunked is None

    # ================================================================ messages
    def add_request(self, req: Req) -> None:
        self.output.add(req)
        if self.speculative is not None:
            req.spec_verify_ct = 0
        self.waiting.append(req)

    def abort(self, rid: str | None) -> None:
        reason = FinishReason("abort", message="Abort requested")
        for req in list(self.waiting):
            if rid is None or req.rid == rid:
                self.waiting.remove(req)
                self._finish(req, reason)
        for req in self.running + ([self.chunked] if self.chunked else []):
            if rid is None or req.rid == rid:
                req.to_abort = reason  # at the next step, when its KV is consistent

    def flush_cache(self) -> bool:
        """Refused while requests are queued or running; while paused, only while any holds KV."""
        if self.holds_kv() or (self.waiting and not self.paused):
            logger.warning(
                "Cache not flushed because there are pending requests. #queue-req: %d, #running-req: %d",
                len(self.waiting),
                len(self.running),
            )
            return False
        self.cache.reset()
        logger.info("Cache flushed successfully!")
        return True

    def fail_all(self, message: str) -> None:
        reqs = self.waiting + self.running + ([self.chunked] if self.chunked else [])
        self.waiting, self.running, self.chunked = [], [], None
        for req in reqs:
            req.finished_reason = abort_reason(message, 500, "InternalServerError")
        self.output.emit(reqs)
        self.cache.reset()

    def _finish(self, req: Req, reason: FinishReason) -> None:
        """End a request that is not (or no longer) in `running`: free its KV and report it."""
        req.finished_reason = reason
        if self.chunked is req:
            self.chunked = None
        self.cache.cache_req(req, finished=True)
        self.output.emit([req])

    # ================================================================ prefill
    def _schedule_prefill(self) -> list[PrefillItem]:
        chunked, self.chunked = self.chunked, None
        if chunked is not None and chunked.to_abort:
            self._finish(chunked, chunked.to_abort)
            chunked = None
        items, self.chunked = self.adder.schedule(
            self.waiting, self.running, chunked, self.decode_room.new_token_ratio
        )
        return items

    def _run_prefill(self, items: list[PrefillItem], decoding: list[Req]) -> None:
        """One EXTEND forward for `items`; with --enable-mixed-chunk, `decoding` (the running
        requests, their next slots already allocated) ride along as one-token rows at the end."""
        out_loc = torch.cat([self.cache.slots_of(it.req, it.start, it.length) for it in items])
        batch = self.runner.make_batch(
            ForwardMode.EXTEND,
            [StepInput(it.req, it.start, it.length) for it in items],
            out_loc,
            decode_items=[StepInput(r, r.kv_len, 1) for r in decoding],
        )
        rows, plan = logit_rows(items)
        first_decode_row = len(rows)
        rows.extend(range(sum(it.length for it in items), sum(it.length for it in items) + len(decoding)))
        logits, hidden = self.runner.forward(batch, torch.tensor(rows, dtype=torch.int64))

        self.counters.num_prefill_tokens += sum(it.length for it in items)
        log_prefill(self.stats(), len(items), sum(it.length for it in items), sum(it.start for it in items))
        to_sample, sample_rows = [], []
        for it, (first, lp_rows, sample_row) in zip(items, plan):
            req = it.req
            req.kv_len += it.length
            self.output.guarded(
                req, lambda r=req, f=first, p=lp_rows: record_prefill(r, logits[f : f + len(p)], p)
            )
            if sample_row is None and not req.finished:
                self.cache.cache_req(req, finished=False)
                continue
            if req.return_embedding and not req.to_abort and not req.finished:  # from the last prompt token
                req.embedding = self.runner.pool(hidden[first + len(lp_rows)])
            if req.max_new_tokens == 0 or req.to_abort or req.finished:
                self._finish(req, req.finished_reason or req.to_abort or FinishReason("length", length=0))
                continue
            self.cache.cache_req(req, finished=False)  # its prompt, for requests sharing it from now on
            to_sample.append(req)
            sample_rows.append(first + len(lp_rows))
        self._advance_decode(decoding)
        self.counters.num_mixed_steps += bool(decoding)
        if to_sample or decoding:
            sample_rows = [*range(first_decode_row, first_decode_row + len(decoding)), *sample_rows]
            self._sample(decoding + to_sample, logits[torch.tensor(sample_rows)])
            self._after_decode(decoding)
            self.running.extend(r for r in to_sample if not r.finished)
        self.run_step_hooks()

    # ================================================================ decode
    def _run_decode(self) -> None:
        reqs = self._prepare_decode()
        if not reqs:
            return
        if self.speculative is not None and self.speculative.step(reqs):
            self._after_decode(reqs)
            self.run_step_hooks()
            return
        out_loc = self.cache.req_to_token.table[
            torch.tensor([r.req_pool_row for r in reqs]), torch.tensor([r.kv_len for r in reqs])
        ]
        batch = self.runner.make_batch(
            ForwardMode.DECODE,
            [StepInput(r, r.kv_len, 1) for r in reqs],
            out_loc,
        )
        logits, _ = self.runner.forward(batch, torch.arange(len(reqs)))
        self._advance_decode(reqs)
        self._sample(reqs, logits)
        self._after_decode(reqs)
        self.run_step_hooks()

    def _prepare_decode(self) -> list[Req]:
        """Drop aborted requests, make room, and give each running request its next KV slot
        (at position kv_len of its row); return the requests that decode this step."""
        for req in [r for r in self.running if r.to_abort]:
            self.running.remove(req)
            self._finish(req, req.to_abort)
        too_big = self.decode_room.ensure(self.running, self.waiting) if self.running else None
        if too_big is not None:
            size = self.cache.kv_pool.size
            self._finish(
                too_big,
                abort_reason(f"The KV cache pool ({size} tokens) is too small for this request.", 400),
            )
        if not self.running:
            return []
        self.cache.alloc_decode_slots(self.running)
        self.counters.decode_starts()
        return list(self.running)

    @staticmethod
    def _advance_decode(reqs: list[Req]) -> None:
        for req in reqs:
            req.kv_len += 1

    def _after_decode(self, reqs: list[Req]) -> None:
        if not reqs:
            return
        self.running = [r for r in self.running if not r.finished]
        self.counters.decoded(len(reqs))
        self.decode_room.decayed()
        if self.counters.decode_steps % self.args.decode_log_interval == 0:
            self.counters.close_window()
            log_decode(self.stats())

    def _sample(self, reqs: list[Req], logits: torch.Tensor) -> None:
        result = self.sampler(logits, reqs, want_logprobs=any(r.return_logprob for r in reqs))
        self.output.process_sampled(reqs, result)
        for req in reqs:
            if req.finished:
                self.cache.cache_req(req, finished=True)
        self.output.emit(reqs)

    # ================================================================ stats
    def stats(self, check_pool: bool = False) -> SchedulerStats:
        """The one snapshot of load and KV figures; `check_pool` runs the integrity check when
        idle (call it on the scheduler thread, as `Engine.stats` does)."""
        whole = self.cache.pool_whole() if check_pool and self.is_idle() else None
        busy = len(self.running) + (self.chunked is not None)
        return snapshot(self.cache, busy, self.waiting, self.counters, whole)
