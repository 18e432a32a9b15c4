"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings.

Requests are mapped onto `/generate` inputs (SGLang's adapter mapping, see native_api.md §4);
errors are `{"object": "error", "message", "type": "BadRequestError", "param", "code"}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from research_rt.core.errors import RequestError
from research_rt.engine.collector import GenerateEvent
from research_rt.frontend.embedding_input import EmbeddingInput
from research_rt.frontend.generate_input import GenerateInput
from research_rt.server.native import check_embedding_model
from research_rt.server.openai_request import chat_input, check, completion_input, include_usage
from research_rt.server.openai_response import chat_logprobs, completion_logprobs, finish_of, usage_of
from research_rt.server.protocol import (
    openai_error_body,
    parse_json,
)
from research_rt.server.sse import stream_events
from research_rt.server.state import ServerState


async def _stream(
    request: Request,
    state: ServerState,
    obj: GenerateInput,
    n: int,
    make_chunks: Any,
    include_usage: bool,
    base: dict[str, Any],
) -> None:
    """One OpenAI stream through the SSE driver (sse.py): `make_chunks(index, resp, finished)`
    returns the chunks for an event; a usage chunk closes it when asked for."""
    finals: dict[int, dict[str, Any]] = {}

    def render(event: GenerateEvent) -> list[dict[str, Any]]:
        if event.finished:
            if event.error is not None:
                raise RequestError(*event.error)
            finals[event.index] = event.response
        return make_chunks(event.index, event.response, event.finished)

    def finish() -> list[dict[str, Any]]:
        if not include_usage:
            return []
        return [{**base, "choices": [], "usage": usage_of(state, [finals[i] for i in sorted(finals)], n)}]

    def render_error(e: RequestError) -> dict[str, Any]:
        return {"error": openai_error_body(e.message, e.status_code)}

    await stream_events(request, state.generate(obj), render, render_error, finish)


async def completions(request: Request) -> HTTPResponse | None:
    state = _state(request)
    body = parse_json(request.body)
    obj, logprobs, echo = completion_input(body, state.engine.vocab_size)
    prompts, _ = obj.prompts()
    n = int(obj.sampling_params.get("n", 1))  # type: ignore[union-attr]
    tok = state.tokenizer

    def prompt_text(i: int) -> str:
        p = prompts[i // n]
        return p if isinstance(p, str) else (tok.decode(p) if tok is not None else "")

    base = {
        "id": "cmpl-" + uuid.uuid4().hex,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model") or state.served_model_name,
    }

    def logprob_block(
        meta: dict[str, Any], out_from: int = 0, with_input: bool = False
    ) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        entries = meta["output_token_logprobs"][out_from:]
        tops = meta.get("output_top_logprobs", [])[out_from:] if logprobs else None
        if with_input:
            entries = meta["input_token_logprobs"] + entries
            tops = (meta.get("input_top_logprobs", []) + tops) if tops is not None else None
        return completion_logprobs(entries, tops)

    if obj.stream:
        sent_text: dict[int, int] = {}
        sent_lp: dict[int, int] = {}

        def chunks(index: int, resp: dict[str, Any], finished: bool) -> list[dict[str, Any]]:
            meta, text = resp["meta_info"], resp.get("text", "")
            first = index not in sent_text
            delta = text[sent_text.get(index, 0) :]
            lp = logprob_block(meta, sent_lp.get(index, 0), first and echo)
            sent_text[index] = len(text)
            sent_lp[index] = meta["completion_tokens"]
            if first and echo:
                delta = prompt_text(index) + delta
            reason, matched = finish_of(meta)
            if not delta and not finished and not lp:
                return []
            choice = {
                "index": index,
                "text": delta,
                "logprobs": lp,
                "finish_reason": reason,
                "matched_stop": matched,
            }
            return [{**base, "choices": [choice]}]

        await _stream(request, state, obj, n, chunks, include_usage(body), base)
        return None

    finals = await state.collect(obj)
    choices = []
    for i, resp in enumerate(finals):
        meta = resp["meta_info"]
        reason, matched = finish_of(meta)
        text = (prompt_text(i) if echo else "") + resp.get("text", "")
        choices.append(
            {
                "index": i,
                "text": text,
                "logprobs": logprob_block(meta, 0, echo),
                "finish_reason": reason,
                "matched_stop": matched,
            }
        )
    return json(
        {
            **base,
            "id": "cmpl-" + finals[0]["meta_info"]["id"],
            "choices": choices,
            "usage": usage_of(state, finals, n),
        }
    )


async def chat_completions(request: Request) -> HTTPResponse | None:
    state = _state(request)
    body = parse_json(request.body)
    obj, want_lp = chat_input(state.tokenizer, body, state.engine.vocab_size)
    sp = obj.sampling_params
    n = int(sp.get("n", 1))
    base = {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model") or state.served_model_name,
    }

    def lp_block(meta: dict[str, Any], start: int = 0) -> dict[str, Any] | None:
        if not want_lp:
            return None
        return chat_logprobs(
            meta["output_token_logprobs"][start:], meta.get("output_top_logprobs", [])[start:] or None
        )

    if obj.stream:
        sent: dict[int, tuple[int, int]] = {}

        def chunks(index: int, resp: dict[str, Any], finished: bool) -> list[dict[str, Any]]:
            meta, text = resp["meta_info"], resp.get("text", "")
            out = []
            if index not in sent:
                out.append(
                    {
                        **base,
                        "choices": [
                            {
                                "index": index,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            chars, toks = sent.get(index, (0, 0))
            delta, lp = text[chars:], lp_block(meta, toks)
            sent[index] = (len(text), meta["completion_tokens"])
            if delta or (lp and lp["content"]):
                out.append(
                    {
                        **base,
                        "choices": [
                            {
                                "index": index,
                                "delta": {"content": delta},
                                "logprobs": lp,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            if finished:
                reason, matched = finish_of(meta)
                out.append(
                    {
                        **base,
                        "choices": [
                            {
                                "index": index,
                                "delta": {},
                                "logprobs": None,
                                "finish_reason": reason,
                                "matched_stop": matched,
                            }
                        ],
                    }
                )
            return out

        await _stream(request, state, obj, n, chunks, include_usage(body), base)
        return None

    finals = await state.collect(obj)
    choices = []
    for i, resp in enumerate(finals):
        reason, matched = finish_of(resp["meta_info"])
        message = {
            "role": "assistant",
            "content": resp.get("text", ""),
            "reasoning_content": None,
            "tool_calls": None,
        }
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": lp_block(resp["meta_info"]),
                "finish_reason": reason,
                "matched_stop": matched,
            }
        )
    return json(
        {**base, "object": "chat.completion", "choices": choices, "usage": usage_of(state, finals, n)}
    )


async def models(request: Request) -> HTTPResponse:
    state = _state(request)
    name = state.served_model_name
    card = {
        "id": name,
        "object": "model",
        "created": int(state.started),
        "owned_by": "sglang",
        "root": name,
        "max_model_len": state.engine.context_len,
    }
    return json({"object": "list", "data": [card]})


async def embeddings(request: Request) -> HTTPResponse:
    """`input`: str | list[str] | list[int] | list[list[int]] -> one `data` item per input."""
    state = _state(request)
    body = parse_json(request.body)
    inp = body.get("input")
    check(inp is not None, "Field 'input' is required.")
    is_ids = isinstance(inp, list) and bool(inp) and not any(isinstance(x, str) for x in inp)
    obj = EmbeddingInput(input_ids=inp) if is_ids else EmbeddingInput(text=inp)
    obj.prompts()
    check_embedding_model(state)
    results, _ = await state.encode(obj)
    tokens = sum(r["meta_info"]["prompt_tokens"] for r in results)
    return json(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": r["embedding"], "index": i}
                for i, r in enumerate(results)
            ],
            "model": state.model_path,
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
    )


def _state(request: Request) -> ServerState:
    return request.app.ctx.state


def register(app: Sanic) -> None:
    app.add_route(models, "/v1/models", methods=["GET"])
    app.add_route(completions, "/v1/completions", methods=["POST"])
    app.add_route(chat_completions, "/v1/chat/completions", methods=["POST"])
    app.add_route(embeddings, "/v1/embeddings", methods=["POST"])
