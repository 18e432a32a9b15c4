"""`/generate` responses -> OpenAI objects: finish reasons, usage, and logprob blocks."""

from __future__ import annotations

from typing import Any

from research_rt.server.state import ServerState


def finish_of(meta: dict[str, Any]) -> tuple[str | None, Any]:
    reason = meta.get("finish_reason")
    if not reason:
        return None, None
    return reason["type"], reason.get("matched")


def usage_of(state: ServerState, finals: list[dict[str, Any]], n: int) -> dict[str, Any]:
    prompt = sum(r["meta_info"]["prompt_tokens"] for i, r in enumerate(finals) if i % n == 0)
    completion = sum(r["meta_info"]["completion_tokens"] for r in finals)
    cached = sum(r["meta_info"]["cached_tokens"] for r in finals)
    details = {"cached_tokens": cached} if state.server_args.enable_cache_report else None
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
    }


def completion_logprobs(entries: list[Any], tops: list[Any] | None) -> dict[str, Any]:
    return {
        "text_offset": [-1] * len(entries),
        "token_logprobs": [e[0] for e in entries],
        "tokens": [e[2] for e in entries],
        "top_logprobs": [
            None if t is None else {x[2]: x[0] for x in t} for t in (tops or [None] * len(entries))
        ],
    }


def chat_logprobs(entries: list[Any], tops: list[Any] | None) -> dict[str, Any]:
    def item(e: Any) -> dict[str, Any]:
        tok = e[2] or ""
        return {"token": tok, "bytes": list(tok.encode("utf-8")), "logprob": e[0]}

    tops = tops or [[] for _ in entries]
    return {
        "content": [{**item(e), "top_logprobs": [item(x) for x in t or []]} for e, t in zip(entries, tops)]
    }
