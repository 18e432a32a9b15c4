"""What the server says about itself: /get_model_info and /model_info, /get_server_info and
/server_info, /get_load (sglang-router's shape), /health (503 until warmed up and while draining)
and /health_generate."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from typing import Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse, json, raw

import research_rt
from research_rt.frontend.embedding_input import EmbeddingInput
from research_rt.frontend.generate_input import GenerateInput
from research_rt.server.state import ServerState

logger = logging.getLogger("research_rt.server")

HEALTH_CHECK_TIMEOUT = 20.0


def _state(request: Request) -> ServerState:
    return request.app.ctx.state


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
        max_total_num_tokens=engine.max_total_num_tokens,
        max_req_input_len=engine.max_req_input_len,
        context_len=engine.context_len,
        max_running_requests=info["max_running_requests"] or engine.max_running_requests,
        version=research_rt.__version__,
        attention_backend=state.server_args.attention_backend or "torch_native",
        sampling_backend=state.server_args.sampling_backend or "pytorch",
        weight_version=engine.weight_version,  # live: /update_weight_version changes it
        compiled_decode=engine.compiled_decode(),  # shape families compiled so far (graph_runner.py)
    )
    info.update(await state.live_stats())
    return json(info)


async def get_load(request: Request) -> HTTPResponse:
    """SGLang 0.5's shape, one entry per DP rank (research_rt serves one): `dp_rank`, `num_reqs`
    (running + waiting), `num_waiting_reqs`, `num_tokens` (KV in use + waiting prompt tokens), which
    sglang-router's power_of_two policy reads; research_rt's own pool figures ride along."""
    engine = _state(request).engine
    stats = engine.load()
    entry = {
        "dp_rank": 0,
        "num_reqs": stats.num_running_reqs + stats.num_queue_reqs,
        "num_waiting_reqs": stats.num_queue_reqs,
        "num_tokens": stats.num_used_tokens + stats.num_waiting_tokens,
    }
    pool = {  # research_rt's own pool figures
        "num_running_reqs": stats.num_running_reqs,
        "num_used_tokens": stats.num_used_tokens,
        "num_cached_tokens": stats.num_cached_tokens,
        "num_free_tokens": stats.num_free_tokens,
    }
    return json([{**entry, **pool}])


async def health(request: Request) -> HTTPResponse:
    """200 once warmed up; 503 while starting and while shutting down. Never touches the model."""
    status = 200 if is_ready(request.app) else 503
    return raw(b"", status=status, content_type="text/plain; charset=utf-8")


async def health_generate(request: Request) -> HTTPResponse:
    """200 as soon as a one-token generation produces any output, 503 otherwise (20 s).

    While generation is paused (`/pause_generation`) it answers 200 without a probe: the probe
    would wait for `/continue_generation` like any request and time out, and a router or
    orchestrator would then take a worker that is merely being refit for dead. (SGLang probes and
    answers 503 after its timeout.)"""
    state = _state(request)
    if not is_ready(request.app):
        return raw(b"", status=503, content_type="text/plain; charset=utf-8")
    if state.engine.paused is not None:
        return raw(b"", status=200, content_type="text/plain; charset=utf-8")
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


def register(app: Sanic) -> None:
    app.add_route(get_model_info, "/get_model_info", methods=["GET"])
    app.add_route(model_info, "/model_info", methods=["GET"])
    app.add_route(get_server_info, "/get_server_info", methods=["GET"])
    app.add_route(get_server_info, "/server_info", methods=["GET"], name="server_info")
    app.add_route(get_load, "/get_load", methods=["GET"])
    app.add_route(health, "/health", methods=["GET"])
    app.add_route(health, "/ping", methods=["GET"], name="ping")
    app.add_route(health_generate, "/health_generate", methods=["GET"])
