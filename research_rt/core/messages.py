"""Typed messages between the caller threads (the front) and the scheduler thread.

Front -> scheduler, through the scheduler's inbox: `AddReq`, `AbortReq`, `FlushCache`,
`CallInScheduler`, `PauseGeneration`, `ContinueGeneration` (all but the first two answer through
a `concurrent.futures.Future`).
Scheduler -> front: `ReqOutput`, an immutable snapshot of one request after a step. Responses are
built from snapshots only; the live `Req` never leaves the scheduler thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from research_rt.core.interventions import CapturedEntry
from research_rt.core.req import FinishReason, Req


@dataclass(frozen=True)
class AddReq:
    req: Req


@dataclass(frozen=True)
class AbortReq:
    rid: str | None  # None: every request


@dataclass(frozen=True)
class FlushCache:
    reply: Future = field(default_factory=Future)  # True when flushed, False when requests are pending


@dataclass(frozen=True)
class CallInScheduler:
    fn: Callable[[], Any]
    reply: Future = field(default_factory=Future)  # fn's result, or its exception


PAUSE_MODES = ("abort", "retract", "in_place")


@dataclass(frozen=True)
class PauseGeneration:
    """Stop running forwards until `ContinueGeneration` (requests that arrive meanwhile wait).
    abort: end every queued and running request first; retract: move the running ones back to
    the queue, freeing their KV slots (what they computed stays in the prefix cache); in_place:
    keep them, KV and all, and resume them exactly where they were."""

    mode: str = "abort"
    reply: Future = field(default_factory=Future)  # None once the mode's effect is applied


@dataclass(frozen=True)
class ContinueGeneration:
    reply: Future = field(default_factory=Future)  # whether generation was paused


SchedulerMessage = AddReq | AbortReq | FlushCache | CallInScheduler | PauseGeneration | ContinueGeneration


@dataclass(frozen=True)
class LogprobsSnapshot:
    """A request's logprob entries so far (v0.4.5 layout, native_api.md §2.5): (logprob, token id)
    pairs; the top-k and given-token lists are None when the request did not ask for them."""

    input_token_logprobs: list[tuple[float | None, int]]
    output_token_logprobs: list[tuple[float, int]]
    input_top_logprobs: list[Any] | None = None
    output_top_logprobs: list[Any] | None = None
    input_token_ids_logprobs: list[Any] | None = None
    output_token_ids_logprobs: list[Any] | None = None


@dataclass(frozen=True)
class ReqOutput:
    """One request's state after a step, cumulative and copied (the scheduler moves on)."""

    rid: str
    finished_reason: FinishReason | None
    prompt_tokens: int
    output_ids: list[int]
    cached_tokens: int
    created: float  # time.monotonic() when the request was made (for e2e_latency)
    text: str | None = None  # detokenized output (None without a tokenizer)
    logprobs: LogprobsSnapshot | None = None
    hidden_states: list[Any] | None = None
    embedding: list[float] | None = None
    captured: tuple[CapturedEntry, ...] | None = None  # the request's `capture`, once finished
    error: tuple[str, int] | None = None  # (message, HTTP status) of an abort meant as a client error
    spec: tuple[int, int, int] | None = None  # (verify forwards, drafted, accepted) when speculating

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def e2e_latency(self) -> float:
        return time.monotonic() - self.created

    @staticmethod
    def of(req: Req, text: str | None) -> ReqOutput:
        logprobs = None
        if req.return_logprob:
            top, given = bool(req.top_logprobs_num), bool(req.token_ids_logprob)
            logprobs = LogprobsSnapshot(
                list(req.input_token_logprobs),
                list(req.output_token_logprobs),
                list(req.input_top_logprobs) if top else None,
                list(req.output_top_logprobs) if top else None,
                list(req.input_token_ids_logprobs) if given else None,
                list(req.output_token_ids_logprobs) if given else None,
            )
        return ReqOutput(
            rid=req.rid,
            finished_reason=req.finished_reason,
            prompt_tokens=len(req.input_ids),
            output_ids=list(req.output_ids),
            cached_tokens=req.cached_tokens,
            created=req.created,
            text=text,
            logprobs=logprobs,
            hidden_states=_hidden_states(req),
            embedding=req.embedding,
            captured=_captured(req),
            error=req.error,
            spec=None
            if req.spec_verify_ct is None
            else (req.spec_verify_ct, req.spec_draft_token_num, req.spec_accept_token_num),
        )


def _hidden_states(req: Req) -> list[Any] | None:
    if not req.return_hidden_states:
        return None
    return req.captured.hidden_states(len(req.input_ids)) if req.captured is not None else []


def _captured(req: Req) -> tuple[CapturedEntry, ...] | None:
    spec = req.interventions
    if not req.finished or spec is None or spec.capture is None or req.captured is None:
        return None
    return req.captured.entries(spec.capture)
