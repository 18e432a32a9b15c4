"""`/generate` and `/encode` response dicts, built from the scheduler's `ReqOutput` snapshots."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from research_rt.core.interventions import CapturedEntry
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
    if out.spec is not None:
        meta.update(spec_meta_info(*out.spec))
    if out.hidden_states is not None:
        meta["hidden_states"] = out.hidden_states
    if out.captured is not None:
        meta["captured"] = [captured_json(e, tokenizer) for e in out.captured]
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


def captured_json(entry: CapturedEntry, tokenizer: Any) -> dict[str, Any]:
    """`{"layer", "site", "positions", "shape", "dtype", "data"}`: `data` base64 of little-endian
    float32 (row-major), or nested lists with `"format": "list"`. Logit-lens entries hold the top-k
    log-probabilities per position, with their `token_ids` (and `tokens`, with a tokenizer)."""
    data = entry.data.float()
    out: dict[str, Any] = {
        "layer": entry.layer,
        "site": entry.site,
        "positions": list(entry.positions),
        "shape": list(data.shape),
        "dtype": "float32",
    }
    if entry.format == "list":
        out["data"] = data.tolist()
    else:
        out["data"] = base64.b64encode(data.numpy().astype("<f4").tobytes()).decode("ascii")
    if entry.token_ids is not None:
        ids = entry.token_ids.tolist()
        out["token_ids"] = ids
        if tokenizer is not None:
            out["tokens"] = [[tokenizer.decode([t]) for t in row] for row in ids]
    return out


def decode_captured(entry: dict[str, Any]) -> np.ndarray:
    """A `meta_info["captured"]` entry's data as a float32 array of its shape (either format)."""
    data = entry["data"]
    if isinstance(data, str):
        return np.frombuffer(base64.b64decode(data), dtype="<f4").reshape(entry["shape"])
    return np.asarray(data, dtype=np.float32).reshape(entry["shape"])


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


def spec_meta_info(verify_ct: int, drafted: int, accepted: int) -> dict[str, Any]:
    """SGLang's speculative fields: verify forwards, draft tokens proposed / accepted, their ratio,
    and tokens emitted per verify forward (accepted drafts + the target's own token)."""
    return {
        "spec_verify_ct": verify_ct,
        "spec_draft_token_num": drafted,
        "spec_accept_token_num": accepted,
        "spec_accept_rate": accepted / drafted if drafted else 0.0,
        "spec_accept_length": (accepted + verify_ct) / verify_ct if verify_ct else 0.0,
    }
