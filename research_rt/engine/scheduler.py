"""The scheduler loop: admission, chunked prefill, continuous-batching decode, retraction, aborts.

One `step()` runs at most one forward: a prefill (EXTEND) batch when requests can be admitted or
a chunked request continues, otherwise a decode of every running request. The offline Engine and
the HTTP server drive the same loop on a background thread (`run_forever`).

KV ownership (see radix_cache.py for the four states of a slot):
- admission matches the longest cached prefix, locks its node and points the request's row at
  those slots (`cache_protected_len` of them); new slots come from the pool, evicting unlocked
  cache entries when the pool is short;
- after every prefill chunk the computed tokens are inserted into the tree (so a retracted or
  chunked request resumes from there and others can share them) and the lock moves down;
- when a request finishes or is aborted, its computed tokens are inserted too; slots the tree
  already had (computed twice by concurrent requests) are freed; the lock is released, the row freed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from research_rt.cache.radix_cache import RadixCache
from research_rt.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from research_rt.engine.logprobs import record_input_logprobs, record_output_logprobs
from research_rt.engine.loop import SchedulerLoop
from research_rt.engine.prefill import PrefillItem, decode_reserve, max_prefix_len, order_waiting
from research_rt.engine.req import FinishReason, Req, abort_reason
from research_rt.executor.forward_batch import ForwardMode
from research_rt.executor.model_runner import ModelRunner, StepInput

logger = logging.getLogger("research_rt.scheduler")

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.14
NEW_TOKEN_RATIO_DECAY = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / 600


@dataclass
class ReqOutput:
    """What the scheduler reports for a request after a step (cumulative).

    `req` is the live request, which may have moved on by the time the front reads it;
    `num_output_ids` is how many output tokens this report covers (a snapshot).
    """

    req: Req
    text: str | None
    finished: bool
    num_output_ids: int = -1

    def __post_init__(self) -> None:
        if self.num_output_ids < 0:
            self.num_output_ids = len(self.req.output_ids)


@dataclass
class Control:
    """A message from the front: `kind` in {abort, abort_all, flush_cache, call}."""

    kind: str
    rid: str | None = None
    fn: Callable[[], Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None


class Scheduler(SchedulerLoop):
    def __init__(
        self, runner: ModelRunner, tokenizer: Any, args, on_output: Callable[[list[ReqOutput]], None]
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.args = args
        self.on_output = on_output
        self.kv_pool = runner.kv_pool
        self.req_to_token = runner.req_to_token
        self.tree = RadixCache(self.kv_pool, disable=args.disable_radix_cache)
        self.chunk_size = (
            args.chunked_prefill_size
            if args.chunked_prefill_size and args.chunked_prefill_size > 0
            else 1 << 30
        )
        self.max_running = runner.max_running_requests
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None
        self.inbox: queue.Queue[Req | Control] = queue.Queue()
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO * args.schedule_conservativeness
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self.decode_steps = 0
        self.last_gen_throughput = 0.0
        self._decode_tokens_since_log = 0
        self._decode_log_start = time.monotonic()
        self.num_prefill_tokens = 0
        self.num_cached_tokens = 0
        self.num_retractions = 0
        self.num_mixed_steps = 0  # prefill forwards that carried running decodes (mixed chunks)
        self.step_hooks: list[Callable[[Scheduler], None]] = []

    # ================================================================ loop
    def step(self) -> bool:
        self._drain_inbox()
        prefill = self._schedule_prefill()
        if prefill:
            self._run_prefill(prefill, self._prepare_decode() if self._can_mix() else [])
            return True
        if self.running:
            self._run_decode()
            return True
        return False

    def is_idle(self) -> bool:
        return not self.waiting and not self.running and self.chunked is None

    # ================================================================ inbox
    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(item)

    def _handle(self, item: Req | Control) -> None:
        if isinstance(item, Req):
            self._add_request(item)
            return
        if item.kind in ("abort", "abort_all"):
            self._abort(item.rid if item.kind == "abort" else None)
        elif item.kind == "flush_cache":
            item.result = self.flush_cache()
        elif item.kind == "call":
            assert item.fn is not None
            try:
                item.result = item.fn()
            except Exception as e:  # noqa: BLE001 - handed back to the caller
                item.result = e
        item.done.set()

    def _add_request(self, req: Req) -> None:
        if self.tokenizer is not None:
            sp = req.sampling
            self.detok[req.rid] = IncrementalDetokenizer(
                self.tokenizer, req.input_ids, sp.skip_special_tokens, sp.spaces_between_special_tokens
            )
        self.waiting.append(req)

    def _abort(self, rid: str | None) -> None:
        reason = FinishReason("abort", message="Abort requested", status_code=None, err_type=None)
        for req in list(self.waiting):
            if rid is None or req.rid == rid:
                self.waiting.remove(req)
                req.finished_reason = reason
                self._emit([req])
        for req in self.running + ([self.chunked] if self.chunked else []):
            if rid is None or req.rid == rid:
                req.to_abort = reason

    def flush_cache(self) -> bool:
        if not self.is_idle():
            logger.warning(
                "Cache not flushed because there are pending requests. #queue-req: %d, #running-req: %d",
                len(self.waiting),
                len(self.running),
            )
            return False
        self.tree.reset()
        self.kv_pool.clear()
        self.req_to_token.clear()
        logger.info("Cache flushed successfully!")
        return True

    def _fail_all(self, message: str) -> None:
        reqs = self.waiting + self.running + ([self.chunked] if self.chunked else [])
        self.waiting, self.running, self.chunked = [], [], None
        for req in reqs:
            req.finished_reason = abort_reason(message, 500, "InternalServerError")
        self._emit(reqs)
        self.tree.reset()
        self.kv_pool.clear()
        self.req_to_token.clear()

    # ================================================================ prefill
    def _schedule_prefill(self) -> list[PrefillItem]:
        items: list[PrefillItem] = []
        rem_chunk = min(self.chunk_size, self.args.max_prefill_tokens)
        if self.chunked is not None:
            req, self.chunked = self.chunked, None
            if req.to_abort:
                req.finished_reason = req.to_abort
                self._release(req)
                self._emit([req])
            else:
                length = min(req.seq_len - req.kv_len, rem_chunk)
                if not self._alloc_for(req, length):
                    # running decodes hold the pool; they finish or retract, then this resumes
                    self.chunked = req
                    return items
                items.append(PrefillItem(req, req.kv_len, length, req.kv_len + length == req.seq_len))
                rem_chunk -= length
                if not items[-1].is_last_chunk:
                    self.chunked = req
                    return items
        if not self.waiting or rem_chunk <= 0:
            return items
        room = (
            self.kv_pool.available_size()
            + self.tree.evictable_size
            - decode_reserve(self.running, self.new_token_ratio)
        )
        for req in order_waiting(self.waiting, self.args.schedule_policy, self.tree):
            if len(self.running) + len(items) >= self.max_running or self.req_to_token.available_size() == 0:
                break
            if rem_chunk <= 0:
                break
            prefix, node = self.tree.match_prefix(req.fill_ids[: max_prefix_len(req)])
            extend = req.seq_len - len(prefix)
            need = extend + min(req.max_new_tokens - len(req.output_ids), 4096) * self.new_token_ratio
            if need > room and (self.running or items):
                break
            length = min(extend, rem_chunk)
            self.tree.inc_lock_ref(node)
            # the lock moved slots from evictable to protected: they no longer count as room
            room -= len(prefix)
            req.req_pool_row = self.req_to_token.alloc()  # type: ignore[assignment]
            req.last_node, req.cache_protected_len, req.kv_len = node, len(prefix), len(prefix)
            self.req_to_token.table[req.req_pool_row, : len(prefix)] = prefix
            if not req.is_retracted:
                req.cached_tokens = len(prefix)
                self.num_cached_tokens += len(prefix)
            if not self._alloc_for(req, length):
                self._release(req)
                break
            self.waiting.remove(req)
            room -= need
            rem_chunk -= length
            items.append(PrefillItem(req, len(prefix), length, length == extend))
            if length < extend:
                self.chunked = req
                break
        return items

    def _alloc_for(self, req: Req, n: int) -> bool:
        """Give `req` n new slots at positions kv_len.. (evicting cached prefixes if needed)."""
        short = n - self.kv_pool.available_size()
        if short > 0:
            self.tree.evict(short)
        slots = self.kv_pool.alloc(n)
        if slots is None:
            return False
        self.req_to_token.table[req.req_pool_row, req.kv_len : req.kv_len + n] = slots
        return True

    def _run_prefill(self, items: list[PrefillItem], decoding: list[Req]) -> None:
        """One EXTEND forward for `items`; with --enable-mixed-chunk, `decoding` (the running
        requests, their next slots already allocated) ride along as one-token rows at the end."""
        steps = [StepInput(it.req, it.start, it.length) for it in items]
        out_loc = torch.cat(
            [self.req_to_token.table[it.req.req_pool_row, it.start : it.start + it.length] for it in items]
        )
        batch = self.runner.make_batch(
            ForwardMode.EXTEND,
            steps,
            out_loc,
            capture_hidden=any(r.return_hidden_states for r in decoding),
            decode_items=[StepInput(r, r.kv_len, 1) for r in decoding],
        )
        # rows whose logits we need: input-logprob positions, and the last token of a finished prefill
        rows, plan = [], []
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
        first_decode_row = len(rows)
        rows.extend(range(offset, offset + len(decoding)))
        logits, hidden = self.runner.forward(batch, torch.tensor(rows, dtype=torch.int64))

        self.num_prefill_tokens += sum(it.length for it in items)
        self._log_prefill(items)
        to_sample, sample_rows = [], []
        for it, (first, lp_rows, sample_row) in zip(items, plan):
            req = it.req
            req.kv_len += it.length
            if lp_rows:
                record_input_logprobs(req, logits[first : first + len(lp_rows)], lp_rows)
            if req.return_hidden_states:
                req.hidden_states.append(
                    hidden[first : first + len(lp_rows) + (sample_row is not None)].float().tolist()
                )
            if sample_row is None:
                self._cache_unfinished(req)
                continue
            if req.return_logprob and not req.is_retracted and not req.input_token_logprobs:
                record_input_logprobs(req, logits[:0], [])
            if req.return_embedding and not req.to_abort:  # pooled from the last prompt token
                req.embedding = self.runner.pool(hidden[first + len(lp_rows)])
            if req.max_new_tokens == 0 or req.to_abort:
                req.finished_reason = req.to_abort or FinishReason("length", length=0)
                self._release(req)
                self._emit([req])
                continue
            to_sample.append(req)
            sample_rows.append(first + len(lp_rows))
        self._advance_decode(decoding, first_decode_row, hidden)
        self.num_mixed_steps += bool(decoding)
        if to_sample or decoding:
            sample_rows = [*range(first_decode_row, first_decode_row + len(decoding)), *sample_rows]
            self._sample_and_advance(decoding + to_sample, logits[torch.tensor(sample_rows)])
            self._after_decode(decoding)
            self.running.extend(r for r in to_sample if not r.finished)
        self._after_step()

    # ================================================================ decode
    def _run_decode(self) -> None:
        reqs = self._prepare_decode()
        if not reqs:
            return
        out_loc = self.req_to_token.table[
            torch.tensor([r.req_pool_row for r in reqs]), torch.tensor([r.kv_len for r in reqs])
        ]
        batch = self.runner.make_batch(
            ForwardMode.DECODE,
            [StepInput(r, r.kv_len, 1) for r in reqs],
            out_loc,
            capture_hidden=any(r.return_hidden_states for r in reqs),
        )
        logits, hidden = self.runner.forward(batch, torch.arange(len(reqs)))
        self._advance_decode(reqs, 0, hidden)
        self._sample_and_advance(reqs, logits)
        self._after_decode(reqs)
        self._after_step()

    def _can_mix(self) -> bool:
        """Mixed chunks only when every running request gets its next slot without retraction."""
        return bool(
            self.args.enable_mixed_chunk
            and self.running
            and self.kv_pool.available_size() + self.tree.evictable_size >= len(self.running)
        )

    def _prepare_decode(self) -> list[Req]:
        """Drop aborted requests, make room, and give each running request its next KV slot
        (at position kv_len of its row); return the requests that decode this step."""
        self._drop_aborted()
        if not self.running or not self._ensure_decode_room():
            return []
        out_loc = self.kv_pool.alloc(len(self.running))
        assert out_loc is not None
        rows = torch.tensor([r.req_pool_row for r in self.running])
        self.req_to_token.table[rows, torch.tensor([r.kv_len for r in self.running])] = out_loc
        if self._decode_tokens_since_log == 0:  # throughput counts decoding time, not idle time
            self._decode_log_start = time.monotonic()
        return list(self.running)

    def _advance_decode(self, reqs: list[Req], first_row: int, hidden: torch.Tensor | None) -> None:
        for i, req in enumerate(reqs):
            req.kv_len += 1
            if req.return_hidden_states:
                req.hidden_states.append(hidden[first_row + i].float().tolist())

    def _after_decode(self, reqs: list[Req]) -> None:
        if not reqs:
            return
        self.running = [r for r in self.running if not r.finished]
        self.decode_steps += 1
        self._decode_tokens_since_log += len(reqs)
        self.new_token_ratio = max(self.new_token_ratio - NEW_TOKEN_RATIO_DECAY, MIN_NEW_TOKEN_RATIO)
        if self.decode_steps % self.args.decode_log_interval == 0:
            self._log_decode()

    def _drop_aborted(self) -> None:
        for req in [r for r in self.running if r.to_abort]:
            req.finished_reason = req.to_abort
            self.running.remove(req)
            self._release(req)
            self._emit([req])

    def _ensure_decode_room(self) -> bool:
        """Make one free slot per running request: evict cache, then retract requests."""
        need = len(self.running)
        short = need - self.kv_pool.available_size()
        if short > 0:
            self.tree.evict(short)
        while self.kv_pool.available_size() < len(self.running):
            if len(self.running) == 1:
                req = self.running.pop()
                req.finished_reason = abort_reason(
                    f"The KV cache pool ({self.kv_pool.size} tokens) is too small for this request.", 400
                )
                self._release(req)
                self._emit([req])
                return False
            victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
            self.running.remove(victim)
            self._retract(victim)
            self.tree.evict(len(self.running) - self.kv_pool.available_size())
        return bool(self.running)

    def _retract(self, req: Req) -> None:
        logger.info("Retract request %s (%d tokens computed) back to the queue", req.rid, req.kv_len)
        self._release(req)
        self.num_retractions += 1
        req.is_retracted = True
        self.waiting.insert(0, req)
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO * self.args.schedule_conservativeness

    # ================================================================ sampling
    def _sample_and_advance(self, reqs: list[Req], logits: torch.Tensor) -> None:
        want = any(r.return_logprob for r in reqs)
        result = self.runner.sampler(logits, reqs, want_logprobs=want)
        for i, (req, tok) in enumerate(zip(reqs, result.next_ids)):
            req.output_ids.append(tok)
            if req.return_logprob:
                assert result.logprobs is not None
                record_output_logprobs(req, result.logprobs[i], tok)
            req.check_finished()
            if req.grammar is not None:  # accept the token; a terminated grammar finishes the request
                req.grammar.advance(req)
            self._check_stop_strings(req)
            if req.to_abort and not req.finished:
                req.finished_reason = req.to_abort
            if req.finished:
                self._release(req)
        self._emit(reqs)

    def _check_stop_strings(self, req: Req) -> None:
        detok = self.detok.get(req.rid)
        if detok is None:
            return
        before = len(detok.text)
        text = detok.append([req.output_ids[-1]])
        if req.finished or not req.sampling.stop:
            return
        hit = find_stop_string(text, req.sampling.stop, before)  # type: ignore[arg-type]
        if hit is not None:
            req.finished_reason = FinishReason("stop", matched=hit[0])

    # ================================================================ KV bookkeeping
    def _cache_unfinished(self, req: Req) -> None:
        """After a prefill chunk: hand the computed tokens to the tree, move the lock down."""
        row = req.req_pool_row
        slots = self.req_to_token.table[row, : req.kv_len].clone()
        if self.tree.disable:
            return
        matched = self.tree.insert(req.fill_ids[: req.kv_len], slots)
        self.kv_pool.free(slots[req.cache_protected_len : matched])
        new_slots, new_node = self.tree.match_prefix(req.fill_ids[: req.kv_len])
        assert len(new_slots) == req.kv_len
        self.req_to_token.table[row, : req.kv_len] = new_slots
        self.tree.dec_lock_ref(req.last_node)
        self.tree.inc_lock_ref(new_node)
        req.last_node, req.cache_protected_len = new_node, req.kv_len

    def _release(self, req: Req) -> None:
        """A request leaves the running set (finished, aborted or retracted): see module doc."""
        if req.req_pool_row < 0:
            return
        row = req.req_pool_row
        slots = self.req_to_token.table[row, : req.kv_len].clone()
        if self.tree.disable:
            self.kv_pool.free(slots)
        else:
            matched = self.tree.insert(req.fill_ids[: req.kv_len], slots)
            self.kv_pool.free(slots[req.cache_protected_len : matched])
            self.tree.dec_lock_ref(req.last_node)
        self.req_to_token.free(row)
        req.req_pool_row, req.kv_len, req.cache_protected_len, req.last_node = -1, 0, 0, None

    def _after_step(self) -> None:
        for hook in self.step_hooks:
            hook(self)

    # ================================================================ output
    def _emit(self, reqs: list[Req]) -> None:
        outs = []
        for req in reqs:
            detok = self.detok.get(req.rid)
            text = None
            if detok is not None:
                text = detok.text
                if req.finished:
                    text = self._final_text(req, detok)
                    del self.detok[req.rid]
            outs.append(ReqOutput(req, text, req.finished))
        if outs:
            self.on_output(outs)

    @staticmethod
    def _final_text(req: Req, detok: IncrementalDetokenizer) -> str:
        ids = req.output_ids
        reason = req.finished_reason
        trim = not req.sampling.no_stop_trim
        if trim and reason is not None and reason.type == "stop" and isinstance(reason.matched, int):
            ids = ids[:-1]
        text = detok.final_text(ids)
        if trim and reason is not None and reason.type == "stop" and isinstance(reason.matched, str):
            idx = text.find(reason.matched)
            if idx != -1:
                text = text[:idx]
        return text

    # ================================================================ logs and stats
    def token_usage(self) -> float:
        used = self.kv_pool.size - self.kv_pool.available_size() - self.tree.evictable_size
        return used / self.kv_pool.size

    def _log_prefill(self, items: list[PrefillItem]) -> None:
        logger.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
            "#running-req: %d, #queue-req: %d",
            len(items),
            sum(it.length for it in items),
            sum(it.start for it in items),
            self.token_usage(),
            len(self.running),
            len(self.waiting),
        )

    def _log_decode(self) -> None:
        now = time.monotonic()
        self.last_gen_throughput = self._decode_tokens_since_log / max(now - self._decode_log_start, 1e-9)
        self._decode_tokens_since_log, self._decode_log_start = 0, now
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): %.2f, "
            "#queue-req: %d",
            len(self.running),
            self.kv_pool.size - self.kv_pool.available_size(),
            self.token_usage(),
            self.last_gen_throughput,
            len(self.waiting),
        )
