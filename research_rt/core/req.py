"""A request as the scheduler sees it (`Req`, live state owned by the scheduler thread), and its finish reasons."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from research_rt.core.interventions import CaptureStore, InterventionSpec
from research_rt.core.sampling_params import SamplingParams


@dataclass(frozen=True)
class FinishReason:
    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None
    status_code: int | None = None
    err_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.type == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.type == "length":
            return {"type": "length", "length": self.length}
        return {
            "type": "abort",
            "message": self.message,
            "status_code": self.status_code,
            "err_type": self.err_type,
        }


def abort_reason(
    message: str, status_code: int | None = 400, err_type: str | None = "BadRequestError"
) -> FinishReason:
    return FinishReason("abort", message=message, status_code=status_code, err_type=err_type)


@dataclass(eq=False)
class Req:
    """One sequence. `fill_ids = input_ids + output_ids`; `kv_len` of them have KV in the pool."""

    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    return_hidden_states: bool = False
    stop_ids: frozenset[int] = frozenset()
    logit_processor: Any = None  # offline hook: callable(logits_row, req) -> logits_row, or None
    custom_logit_processor: tuple[str, Any] | None = None  # (serialized string, instance), see
    # custom_logit_processor.py
    grammar: Any = None  # GrammarState (engine/grammar.py) when regex / json_schema / ebnf is set
    return_embedding: bool = False  # embedding / score request: pooled at the end of prefill
    embedding: list[float] | None = None
    stream: bool = False  # report after every step (else: after the first token, and when finished)
    priority: int | None = None  # with --enable-priority-scheduling (scheduler/priority.py); None: 0
    interventions: InterventionSpec | None = None  # capture / steer / ablate (core/interventions.py)
    captured: CaptureStore | None = None  # what the forwards captured for it (with interventions)

    output_ids: list[int] = field(default_factory=list)
    finished_reason: FinishReason | None = None
    to_abort: FinishReason | None = None

    # KV state, owned by the scheduler
    req_pool_row: int = -1
    kv_len: int = 0  # tokens of fill_ids whose KV lives in req_to_token[req_pool_row, :kv_len]
    cache_protected_len: int = 0  # leading tokens that belong to the radix tree (locked via last_node)
    last_node: Any = None
    cached_tokens: int = 0
    is_retracted: bool = False

    # speculative decoding (--speculative-algorithm): verify forwards run for this request (None:
    # speculation off), draft tokens proposed and accepted in them
    spec_verify_ct: int | None = None
    spec_draft_token_num: int = 0
    spec_accept_token_num: int = 0

    # Logprob accumulators (v0.4.5 layout, see native_api.md §2.5)
    input_token_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    input_token_ids_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    output_token_ids_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)

    generator: torch.Generator | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def fill_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def max_new_tokens(self) -> int:
        assert self.sampling.max_new_tokens is not None
        return self.sampling.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def error(self) -> tuple[str, int] | None:
        """(message, HTTP status) when the request ended in an abort the client should see as an error."""
        reason = self.finished_reason
        if reason is None or reason.type != "abort" or reason.status_code is None or reason.status_code < 400:
            return None
        return reason.message or "Request aborted.", reason.status_code

    def check_finished(self) -> None:
        """Set `finished_reason` after a new output token (stop strings are checked by the detokenizer)."""
        if self.finished_reason is not None:
            return
        if len(self.output_ids) >= self.max_new_tokens:
            self.finished_reason = FinishReason("length", length=self.max_new_tokens)
            return
        if not self.output_ids or self.sampling.ignore_eos:
            return
        last = self.output_ids[-1]
        if len(self.output_ids) > self.sampling.min_new_tokens and (
            last in self.stop_ids or last in self.sampling.stop_token_ids  # type: ignore[operator]
        ):
            self.finished_reason = FinishReason("stop", matched=last)
