"""SGLang's native endpoints: /generate, /encode and /classify, info, health, cache, weights, abort,
and the expert-distribution recorder. Info routes answer under both names (/get_server_info and
/server_info, /get_model_info and /model_info): sglang-router 0.3 asks for the new ones."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse, json, raw, text

from research_rt.core.errors import RequestError
from research_rt.engine.engine import GenerateEvent
from research_rt.frontend.embedding_input import NOT_EMBEDDING, NOT_GENERATION, EmbeddingInput
from research_rt.frontend.generate_input import GenerateInput
from research_rt.server.protocol import (
    error_body,
    generate_input,
    parse_json,
)
from research_rt.server.sse import stream_events
from research_rt.server.state import ServerState
from research_rt.server.weights import update_weights_from_disk

logger = logging.getLogger("research_rt.server")

FLUSH_CACHE_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)


def _state(request: Request) -> ServerState:
    return request.app.ctx.state


async def generate(request: Request) -> HTTPResponse | None:
    """POST/PUT /generate: one object (single prompt, n=1) or a list; SSE with `"stream": true`."""
    state = _state(request)
    obj = generate_input(parse_json(request.body))
    if state.engine.is_embedding:
        raise RequestError(NOT_GENERATION)
    single = obj.single_response
    incremental = obj.stream and state.server_args.stream_output
    if obj.stream:
        await stream_generate(request, state, obj, single, incremental)
        return None
    results = await state.collect(obj)
    return json(results[0] if single else results)


async def stream_generate(
    request: Request, state: ServerState, obj: GenerateInput, single: bool, incremental: bool
) -> None:
    """Cumulative SSE events (`index` for batches, every `--stream-interval` tokens), then
    `data: [DONE]`; a request that ends as a client error sends `data: {"error": {...}}` (sse.py)."""
    interval = max(1, state.server_args.stream_interval)
    counts: dict[int, int] = {}

    def render(event: GenerateEvent) -> list[dict[str, Any]]:
        index, resp = event.index, event.response
        counts[index] = counts.get(index, 0) + 1
        if not event.finished and not incremental and counts[index] % interval:
            return []
        if event.error is not None:
            return [error_body(event.error[0])]
        if not single:
            resp["index"] = index
        return [resp]

    await stream_events(request, state.generate(obj, incremental), render, lambda e: error_body(e.message))


async def flush_cache(request: Request) -> HTTPResponse:
    """GET/POST: 200 when flushed, 400 (same text) when refused because requests are pending."""
    engine = _state(request).engine
    ok = await asyncio.get_running_loop().run_in_executor(None, engine.flush_cache)
    return text(FLUSH_CACHE_TEXT, status=200 if ok else 400)


async def update_weights(request: Request) -> HTTPResponse:
    """POST /update_weights_from_disk (alias /update_weights): `{model_path, load_format}`."""
    state = _state(request)
    try:
        body = parse_json(request.body)
        path, load_format = body.get("model_path"), body.get("load_format")
        if not isinstance(path, str) or not path:
            raise RequestError("Field 'model_path' (a non-empty string) is required.")
        if load_format is not None and not isinstance(load_format, str):
            raise RequestError("Field 'load_format' must be a string or null.")
    except RequestError as e:
        return json({"success": False, "message": e.message, "num_paused_requests": 0}, status=400)
    success, message = await update_weights_from_disk(state, path, load_format)
    return json(
        {"success": success, "message": message, "num_paused_requests": 0}, status=200 if success else 400
    )


async def abort_request(request: Request) -> HTTPResponse:
    """`{"rid": ...}` aborts one request (queued: dropped; running: finishes with type abort);
    `{"abort_all": true}` aborts every request."""
    body = parse_json(request.body)
    rid, abort_all = body.get("rid"), body.get("abort_all", False)
    if not isinstance(abort_all, bool):
        raise RequestError("Field 'abort_all' must be a boolean.")
    if rid is not None and not isinstance(rid, str):
        raise RequestError("Field 'rid' must be a string.")
    if not abort_all and not rid:
        raise RequestError("Provide 'rid' (a request id) or 'abort_all': true.")
    _state(request).engine.abort_request(None if abort_all else rid)
    return raw(b"", status=200, content_type="text/plain; charset=utf-8")


EMBEDDING_FIELDS = {  # EmbeddingReqInput's fields (+ "model", which OpenAI-style clients add)
    "text",
    "input_ids",
    "rid",
    "image_data",
    "sampling_params",
    "input_embeds",
    "log_metrics",
    "modalities",
    "model",
}


def embedding_input(body: dict[str, Any]) -> EmbeddingInput:
    """An EmbeddingReqInput body (`sampling_params` is accepted and ignored: max_new_tokens is 0)."""
    unknown = sorted(set(body) - EMBEDDING_FIELDS)
    if unknown:
        raise RequestError(f"Unknown field(s) for an embedding request: {', '.join(unknown)}.")
    obj = EmbeddingInput(
        text=body.get("text"),
        input_ids=body.get("input_ids"),
        rid=body.get("rid"),
        image_data=body.get("image_data"),
        log_metrics=body.get("log_metrics", True) is not False,
    )
    obj.prompts()  # SGLang's input checks first, then the model-type check
    return obj


def check_embedding_model(state: ServerState) -> None:
    if not state.engine.is_embedding:
        raise RequestError(NOT_EMBEDDING)


async def encode(request: Request) -> HTTPResponse:
    """/encode and /classify: `{"embedding": [...], "meta_info": {...}}`, a list for a batch (the
    scores of a reward / classification model are its `embedding`)."""
    state = _state(request)
    obj = embedding_input(parse_json(request.body))
    check_embedding_model(state)
    results, single = await state.encode(obj)
    return json(results[0] if single else results)


EXPERT_TEXTS = {
    "start": "Start recording the expert distribution.\n",
    "stop": "Stop recording the expert distribution.\n",
    "dump": "Dump expert distribution record.\n",
}


async def expert_distribution(request: Request) -> HTTPResponse:
    """start / stop / dump (the CSV goes into the server's working directory)."""
    engine = _state(request).engine
    what = request.route.name.rsplit(".", 1)[-1].split("_", 1)[0]
    action = {
        "start": engine.start_expert_distribution_record,
        "stop": engine.stop_expert_distribution_record,
        "dump": engine.dump_expert_distribution_record,
    }[what]
    await asyncio.get_running_loop().run_in_executor(None, action)
    return text(EXPERT_TEXTS[what])


def register(app: Sanic) -> None:
    app.add_route(generate, "/generate", methods=["POST", "PUT"])
    app.add_route(flush_cache, "/flush_cache", methods=["GET", "POST"])
    app.add_route(update_weights, "/update_weights_from_disk", methods=["POST"])
    app.add_route(update_weights, "/update_weights", methods=["POST"], name="update_weights_alias")
    app.add_route(abort_request, "/abort_request", methods=["POST"])
    app.add_route(encode, "/encode", methods=["POST", "PUT"])
    app.add_route(encode, "/classify", methods=["POST", "PUT"], name="classify")
    for what in ("start", "stop", "dump"):
        app.add_route(
            expert_distribution,
            f"/{what}_expert_distribution_record",
            methods=["GET", "POST"],
            name=f"{what}_expert_distribution_record",
        )
