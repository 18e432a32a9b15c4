"""SGLang's native endpoints: /generate, /encode and /classify, info, health, cache, weights, abort,
and the expert-distribution recorder. Info routes answer under both names (/get_server_info and
/server_info, /get_model_info and /model_info): sglang-router 0.3 asks for the new ones."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from typing import Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse, json, raw, text

import research_rt
from research_rt.engine.embedding import NOT_EMBEDDING, NOT_GENERATION, EmbeddingInput
from research_rt.engine.io_struct import GenerateInput, RequestError
from research_rt.server.protocol import (
    SSE_DONE,
    abort_error,
    error_body,
    generate_input,
    is_single,
    parse_json,
    sse,
)
from research_rt.server.state import ServerState
from research_rt.server.weights import update_weights_from_disk

logger = logging.getLogger("research_rt.server")

FLUSH_CACHE_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)
HEALTH_CHECK_TIMEOUT = 20.0


def _state(request: Request) -> ServerState:
    return request.app.ctx.state


async def generate(request: Request) -> HTTPResponse | None:
    """POST/PUT /generate: one object (single prompt, n=1) or a list; SSE with `"stream": true`."""
    state = _state(request)
    obj = generate_input(parse_json(request.body))
    if state.engine.is_embedding:
        raise RequestError(NOT_GENERATION)
    single = is_single(obj)
    incremental = obj.stream and state.server_args.stream_output
    if obj.stream:
        await stream_generate(request, state, obj, single, incremental)
        return None
    results = await state.collect(obj)
    return json(results[0] if single else results)


async def stream_generate(
    request: Request, state: ServerState, obj: GenerateInput, single: bool, incremental: bool
) -> None:
    """Cumulative SSE events (`index` for batches), `data: [DONE]` at the end.

    Validation errors are raised before the first byte (HTTP 400 JSON); errors after the stream has
    started (an abort with a status) arrive as `data: {"error": {...}}` followed by `[DONE]`.
    """
    interval = max(1, state.server_args.stream_interval)
    counts: dict[int, int] = {}
    async with contextlib.aclosing(state.generate(obj, incremental)) as events:
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        response = await request.respond(
            content_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

        async def send(index: int, resp: dict[str, Any], finished: bool) -> None:
            counts[index] = counts.get(index, 0) + 1
            if not finished and not incremental and counts[index] % interval:
                return
            err = abort_error(resp) if finished else None
            if err is not None:
                await response.send(sse(error_body(err[0])))
                return
            if not single:
                resp["index"] = index
            await response.send(sse(resp))

        try:
            if first is not None:
                await send(*first)
            async for event in events:
                await send(*event)
        except RequestError as e:
            await response.send(sse(error_body(e.message)))
        await response.send(SSE_DONE)
        await response.eof()


def set_ready(app: Sanic, ready: bool) -> None:
    """Mark the server ready (warm-up done) or not (starting, shutting down): /health says 503
    while not ready. An app nobody marks is ready."""
    app.ctx.ready = ready


def is_ready(app: Sanic) -> bool:
    return getattr(app.ctx, "ready", True)


def _model_info(state: ServerState) -> dict[str, Any]:
    return {
        "model_path": state.model_path,
        "tokenizer_path": state.server_args.tokenizer_path,
        "is_generation": not state.server_args.is_embedding,
    }


async def get_model_info(request: Request) -> HTTPResponse:
    """GET /get_model_info: SGLang 0.4's three keys, exactly."""
    return json(_model_info(_state(request)))


async def model_info(request: Request) -> HTTPResponse:
    """GET /model_info (SGLang 0.5's name): the three keys plus what sglang-router reads at
    registration (model type, architectures) and the served name."""
    state = _state(request)
    config = state.engine.config
    return json(
        {
            **_model_info(state),
            "served_model_name": state.served_model_name,
            "model_type": getattr(config, "model_type", None),
            "architectures": list(getattr(config, "architectures", None) or []),
            "preferred_sampling_params": None,
            "weight_version": "default",
        }
    )


async def get_server_info(request: Request) -> HTTPResponse:
    """Server args + pool sizes + version + live scheduler figures (v0.4.5 merges them at top level)."""
    state = _state(request)
    engine = state.engine
    info = {f.name: getattr(state.server_args, f.name) for f in dataclasses.fields(state.server_args)}
    info.pop("extra", None)
    info.update(
        max_total_num_tokens=engine.runner.max_total_num_tokens,
        max_req_input_len=engine.front.max_req_input_len,
        context_len=engine.context_len,
        max_running_requests=info["max_running_requests"] or engine.runner.max_running_requests,
        version=research_rt.__version__,
        attention_backend=state.server_args.attention_backend or "torch_native",
        sampling_backend=state.server_args.sampling_backend or "pytorch",
    )
    info.update(await state.live_stats())
    return json(info)


async def get_load(request: Request) -> HTTPResponse:
    """SGLang 0.5's shape, one entry per DP rank (research_rt serves one): `dp_rank`, `num_reqs`
    (running + waiting), `num_waiting_reqs`, `num_tokens` (KV in use + waiting prompt tokens), which
    sglang-router's power_of_two policy reads; research_rt's own pool figures ride along."""
    engine = _state(request).engine
    load = engine.get_load()
    waiting = list(engine.scheduler.waiting)
    entry = {
        "dp_rank": 0,
        "num_reqs": load["num_running_reqs"] + load["num_waiting_reqs"],
        "num_waiting_reqs": load["num_waiting_reqs"],
        "num_tokens": load["num_used_tokens"] + sum(len(r.input_ids) for r in waiting),
    }
    return json([{**entry, **load}])


async def health(request: Request) -> HTTPResponse:
    """200 once warmed up; 503 while starting and while shutting down. Never touches the model."""
    status = 200 if is_ready(request.app) else 503
    return raw(b"", status=status, content_type="text/plain; charset=utf-8")


async def health_generate(request: Request) -> HTTPResponse:
    """200 as soon as a one-token generation produces any output, 503 otherwise (20 s)."""
    state = _state(request)
    if not is_ready(request.app):
        return raw(b"", status=503, content_type="text/plain; charset=utf-8")
    if state.engine.is_embedding:  # SGLang sends EmbeddingReqInput(input_ids=[0])
        try:
            await asyncio.wait_for(
                state.encode(EmbeddingInput(input_ids=[0], log_metrics=False)), HEALTH_CHECK_TIMEOUT
            )
            ok = True
        except Exception:  # noqa: BLE001 - any failure is "unhealthy"
            logger.exception("health_generate failed")
            ok = False
        return raw(b"", status=200 if ok else 503, content_type="text/plain; charset=utf-8")
    obj = GenerateInput(
        input_ids=[0],
        sampling_params={"max_new_tokens": 1, "temperature": 0},
        rid=f"HEALTH_CHECK_{time.time()}_{uuid.uuid4().hex[:8]}",
        log_metrics=False,
    )

    async def one_output() -> bool:
        async with contextlib.aclosing(state.generate(obj)) as events:
            async for _ in events:
                return True
        return False

    try:
        ok = await asyncio.wait_for(one_output(), HEALTH_CHECK_TIMEOUT)
    except Exception:  # noqa: BLE001 - any failure is "unhealthy"
        logger.exception("health_generate failed")
        ok = False
    return raw(b"", status=200 if ok else 503, content_type="text/plain; charset=utf-8")


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
    app.add_route(get_model_info, "/get_model_info", methods=["GET"])
    app.add_route(model_info, "/model_info", methods=["GET"])
    app.add_route(get_server_info, "/get_server_info", methods=["GET"])
    app.add_route(get_server_info, "/server_info", methods=["GET"], name="server_info")
    app.add_route(get_load, "/get_load", methods=["GET"])
    app.add_route(health, "/health", methods=["GET"])
    app.add_route(health, "/ping", methods=["GET"], name="ping")
    app.add_route(health_generate, "/health_generate", methods=["GET"])
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
