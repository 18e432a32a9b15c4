"""`/generate` and `/encode` response dicts, built from the scheduler's `ReqOutput` snapshots."""

from __future__ import annotations

from typing import Any

from research_rt.core.messages import ReqOutput


def generate_response(
    out: ReqOutput,
    tokenizer: Any,
    with_text_in_logprobs: bool = False,
    ids_from: int = 0,
    weight_version: str | None = None,
) -> dict[str, Any]:
    """The `/generate` response for a snapshot; `output_ids` holds its tokens [ids_from:] (a
    streaming client with incremental output gets only the new ones). `weight_version` (the
    engine's, when given) goes into meta_info."""
    meta: dict[str, Any] = {
        "id": out.rid,
        "finish_reason": out.finished_reason.to_json() if out.finished_reason else None,
        "prompt_tokens": out.prompt_tokens,
    }
    if weight_version is not None:
        meta["weight_version"] = weight_version
    lp = out.logprobs
    if lp is not None:
        decode = tokenizer.decode if (with_text_in_logprobs and tokenizer is not None) else None

        def fmt(entries: list[Any]) -> list[list[Any]]:
            return [[logprob, tid, decode([tid]) if decode else None] for logprob, tid in entries]

        meta["input_token_logprobs"] = fmt(lp.input_token_logprobs)
        meta["output_token_logprobs"] = fmt(lp.output_token_logprobs)
        if lp.input_top_logprobs is not None:
            meta["input_top_logprobs"] = [None if x is None else fmt(x) for x in lp.input_top_logprobs]
            meta["output_top_logprobs"] = [fmt(x) for x in lp.output_top_logprobs or []]
        if lp.input_token_ids_logprobs is not None:
            meta["input_token_ids_logprobs"] = [
                None if x is None else fmt(x) for x in lp.input_token_ids_logprobs
            ]
            meta["output_token_ids_logprobs"] = [fmt(x) for x in lp.output_token_ids_logprobs or []]
    meta["completion_tokens"] = out.completion_tokens
    meta["cached_tokens"] = out.cached_tokens
    if out.hidden_states is not None:
        meta["hidden_states"] = out.hidden_states
    if out.finished:
        meta["e2e_latency"] = out.e2e_latency
    resp: dict[str, Any] = {}
    if out.text is not None:
        resp["text"] = out.text
    resp["output_ids"] = out.output_ids[ids_from:]
    if tokenizer is None:
        resp["token_ids"] = resp["output_ids"]
    resp["meta_info"] = meta
    return resp


def embedding_response(out: ReqOutput, weight_version: str | None = None) -> dict[str, Any]:
    """`{"embedding": [...], "meta_info": {...}}` (a score head's scores are its embedding)."""
    meta: dict[str, Any] = {
        "id": out.rid,
        "finish_reason": out.finished_reason.to_json() if out.finished_reason else None,
        "prompt_tokens": out.prompt_tokens,
    }
    if weight_version is not None:
        meta["weight_version"] = weight_version
    meta["e2e_latency"] = out.e2e_latency
    return {"embedding": out.embedding, "meta_info": meta}
