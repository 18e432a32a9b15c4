"""After a forward: append what was sampled, check each request for its end, and report.

Per request and step: the new token (and its logprobs) is appended; the request finishes on
length, a stop token, its grammar terminating, or a stop string (found by the incremental
detokenizer, which also produces the text); then a `ReqOutput` snapshot goes to the front. A
request reports after every step when it streams, otherwise after its first token and when it
finishes. A failure while processing one request's output ends that request with an internal
error; the others carry on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from research_rt.core.messages import ReqOutput
from research_rt.core.req import FinishReason, Req, abort_reason
from research_rt.sampling.logprobs import record_input_logprobs, record_output_logprobs
from research_rt.sampling.sampler import SampleResult
from research_rt.scheduler.detokenizer import IncrementalDetokenizer, find_stop_string

logger = logging.getLogger("research_rt.scheduler")

OUTPUT_ERROR = "Internal error while processing this request's output; see the server log."


class OutputProcessor:
    def __init__(self, tokenizer: Any, on_output: Callable[[list[ReqOutput]], None]) -> None:
        self.tokenizer = tokenizer
        self.on_output = on_output
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self.reported: set[str] = set()  # requests that sent their first report

    def add(self, req: Req) -> None:
        if self.tokenizer is not None:
            sp = req.sampling
            self.detok[req.rid] = IncrementalDetokenizer(
                self.tokenizer, req.input_ids, sp.skip_special_tokens, sp.spaces_between_special_tokens
            )

    def guarded(self, req: Req, fn: Callable[[], None]) -> None:
        """Run one request's share of output processing; on failure, end that request only."""
        try:
            fn()
        except Exception:  # noqa: BLE001 - logged; the request answers 500, the step goes on
            logger.exception("Processing the output of request %s failed", req.rid)
            if req.finished_reason is None:
                req.finished_reason = abort_reason(OUTPUT_ERROR, 500, "InternalServerError")

    def process_sampled(self, reqs: list[Req], result: SampleResult) -> None:
        """Append each request's sampled token and decide whether it is finished."""
        for i, (req, tok) in enumerate(zip(reqs, result.next_ids)):
            self.guarded(req, lambda req=req, tok=tok, i=i: self._append(req, tok, result.logprobs, i))

    def append_run(self, req: Req, tokens: list[int]) -> None:
        """Append a speculative step's accepted run one token at a time, as decode steps would;
        tokens past the one that finishes the request are dropped."""
        for tok in tokens:
            if req.finished:
                break
            self.guarded(req, lambda tok=tok: self._append(req, tok, None, 0))

    def _append(self, req: Req, tok: int, logprobs: torch.Tensor | None, row: int) -> None:
        req.output_ids.append(tok)
        if req.return_logprob:
            assert logprobs is not None
            record_output_logprobs(req, logprobs[row], tok)
        req.check_finished()
        if req.grammar is not None:  # accept the token; a terminated grammar finishes the request
            req.grammar.advance(req)
        self._check_stop_strings(req)
        if req.to_abort and not req.finished:
            req.finished_reason = req.to_abort

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

    def emit(self, reqs: list[Req]) -> None:
        """Send the snapshots the front needs of `reqs` (see the module doc)."""
        outs = []
        for req in reqs:
            if not (req.finished or req.stream or req.rid not in self.reported):
                continue
            detok = self.detok.get(req.rid)
            text = None
            if detok is not None:
                text = final_text(req, detok) if req.finished else detok.text
            if req.finished:
                self.detok.pop(req.rid, None)
                self.reported.discard(req.rid)
            else:
                self.reported.add(req.rid)
            outs.append(ReqOutput.of(req, text))
        if outs:
            self.on_output(outs)


def record_prefill(req: Req, logits: torch.Tensor, lp_rows: list[int]) -> None:
    """After a prefill chunk: its input logprobs (`logits` rows at prompt positions `lp_rows`)."""
    if lp_rows or (req.return_logprob and not req.is_retracted and not req.input_token_logprobs):
        record_input_logprobs(req, logits, lp_rows)


def final_text(req: Req, detok: IncrementalDetokenizer) -> str:
    """The whole output text, without the matched stop token or string unless `no_stop_trim`."""
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
