"""The endpoints SGLang added after 0.4.5 (same names and shapes as SGLang 0.5): `/tokenize` and
`/detokenize` (also under /v1/), `/v1/score`, and the RL refit API: `/pause_generation`,
`/continue_generation`, `/update_weights_from_tensor`, `/update_weight_version`,
`/get_weight_version`, `/weights_checker`. The Engine does the work (engine/tokenize.py,
score.py, refit.py); every bad input is a 400 whose message names the field.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
from typing import Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from research_rt.core.errors import RequestError
from research_rt.frontend.score_input import ScoreInput
from research_rt.server.protocol import parse_json
from research_rt.server.state import ServerState
from research_rt.server.weights import weight_update_lock

logger = logging.getLogger("research_rt.server")


def _state(request: Request) -> ServerState:
    return request.app.ctx.state


async def _off_loop(fn: Any) -> Any:
    """Run a blocking engine call (one that waits for the scheduler thread) off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn)


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(f"Field '{name}' must be a boolean.")
    return value


# ---------------------------------------------------------------- tokenizer
async def tokenize(request: Request) -> HTTPResponse:
    """`{prompt | messages, add_special_tokens, add_generation_prompt}` -> `{tokens, count, max_model_len}`."""
    body = parse_json(request.body)
    out = _state(request).engine.tokenize(
        body.get("prompt"),
        body.get("messages"),
        body.get("add_special_tokens"),
        body.get("add_generation_prompt"),
    )
    return json(out)


async def detokenize(request: Request) -> HTTPResponse:
    """`{tokens, skip_special_tokens}` -> `{text}`."""
    body = parse_json(request.body)
    if "tokens" not in body:
        raise RequestError("Field 'tokens' (a list of token ids) is required.")
    return json(_state(request).engine.detokenize(body["tokens"], body.get("skip_special_tokens")))


async def score(request: Request) -> HTTPResponse:
    """`{query, items, label_token_ids, apply_softmax, item_first}` -> `{scores, model, usage, object}`."""
    state = _state(request)
    body = parse_json(request.body)
    obj = ScoreInput(
        query=body.get("query"),
        items=body.get("items"),
        label_token_ids=body.get("label_token_ids"),
        apply_softmax=body.get("apply_softmax", False),
        item_first=body.get("item_first", False),
    )
    async with state.lock.reader():
        out = await state.engine.async_score(obj)
    return json(
        {
            "scores": out["scores"],
            "model": state.served_model_name,
            "usage": out["usage"],
            "object": "scoring",
        }
    )


# ---------------------------------------------------------------- pause
async def pause_generation(request: Request) -> HTTPResponse:
    """`{mode: abort | retract | in_place}` (default abort); answers once the mode took effect."""
    body = parse_json(request.body, required=False)
    mode = body.get("mode", "abort")
    engine = _state(request).engine
    await _off_loop(lambda: engine.pause_generation(mode))
    return json({"message": "Generation paused successfully.", "status": "ok"})


async def continue_generation(request: Request) -> HTTPResponse:
    engine = _state(request).engine
    await _off_loop(engine.continue_generation)
    return json({"message": "Generation continued successfully.", "status": "ok"})


# ---------------------------------------------------------------- weights
def decode_named_tensors(entries: Any) -> list[tuple[str, Any]]:
    """`serialized_named_tensors`: base64 strings, each a safetensors file (name -> tensor)."""
    from safetensors.torch import load

    field = "serialized_named_tensors"
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise RequestError(f"Field '{field}' must be a non-empty list of base64-encoded safetensors blobs.")
    named: list[tuple[str, Any]] = []
    for i, entry in enumerate(entries):
        try:
            raw = base64.b64decode(entry, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(f"Field '{field}[{i}]' is not valid base64: {e}.") from e
        try:
            named.extend(load(raw).items())
        except Exception as e:  # noqa: BLE001 - whatever safetensors rejects is the client's input
            raise RequestError(f"Field '{field}[{i}]' is not a safetensors blob: {e}.") from e
    return named


# Weights for a refit, base64 in JSON: the general body limit (app.MAX_BODY_BYTES) is for prompts
MAX_WEIGHTS_BODY_BYTES = 8 << 30


async def _read_body(request: Request, limit: int) -> bytes:
    """A streamed route's whole body, refused (413 JSON) past `limit` bytes."""
    chunks, size = [], 0
    while (chunk := await request.stream.read()) is not None:
        size += len(chunk)
        if size > limit:
            raise RequestError(f"Payload Too Large: this request body may be at most {limit} bytes.", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def update_weights_from_tensor(request: Request) -> HTTPResponse:
    """`{serialized_named_tensors, load_format, flush_cache, abort_all_requests, weight_version}`
    -> `{success, message}`. Waits for in-flight requests, unless generation is paused. A streamed
    route: weights outgrow the server's general body limit, so this one has its own."""
    state = _state(request)
    try:
        body = parse_json(await _read_body(request, MAX_WEIGHTS_BODY_BYTES))
        entries = body.get("serialized_named_tensors")
        named = await _off_loop(lambda: decode_named_tensors(entries))  # big bodies: not on the loop
        load_format, version = body.get("load_format"), body.get("weight_version")
        if load_format is not None and not isinstance(load_format, str):
            raise RequestError("Field 'load_format' must be null or 'direct'.")
        if version is not None and not isinstance(version, str):
            raise RequestError("Field 'weight_version' must be a string or null.")
        flush = _flag(body, "flush_cache", True)
        abort_all = _flag(body, "abort_all_requests", False)
    except RequestError as e:
        return json({"success": False, "message": e.message}, status=e.status_code)
    engine = state.engine
    if abort_all:
        engine.abort_request(None)
    async with weight_update_lock(state):
        success, message = await _off_loop(
            lambda: engine.update_weights_from_tensor(named, load_format, flush, version)
        )
    return json({"success": success, "message": message}, status=200 if success else 400)


async def update_weight_version(request: Request) -> HTTPResponse:
    """`{new_version, abort_all_requests}` -> `{success, message, new_version}`."""
    try:
        body = parse_json(request.body)
        new = body.get("new_version")
        _state(request).engine.update_weight_version(new, _flag(body, "abort_all_requests", False))
    except RequestError as e:
        return json({"success": False, "message": e.message}, status=400)
    return json({"success": True, "message": f"Weight version updated to {new}", "new_version": new})


async def get_weight_version(request: Request) -> HTTPResponse:
    return json({"weight_version": _state(request).engine.weight_version})


async def weights_checker(request: Request) -> HTTPResponse:
    """`{action: checksum | snapshot | compare | reset_tensors}` (default checksum) -> `{success,
    message}`, plus `ranks` (one: research_rt runs one rank) and `per_engine_checksum` for checksum."""
    body = parse_json(request.body, required=False)
    action = body.get("action", "checksum")
    if not isinstance(action, str):
        return json({"success": False, "message": "Field 'action' must be a string."}, status=400)
    engine = _state(request).engine
    success, message, payload = await _off_loop(lambda: engine.check_weights(action))
    out: dict[str, Any] = {"success": success, "message": message}
    if payload is not None:
        out["ranks"] = [payload]
        out["per_engine_checksum"] = hashlib.sha256(payload["per_gpu_checksum"].encode()).hexdigest()
    return json(out, status=200 if success else 400)


def register(app: Sanic) -> None:
    for prefix in ("", "/v1"):
        app.add_route(
            tokenize, f"{prefix}/tokenize", methods=["POST"], name=f"tokenize{prefix.replace('/', '_')}"
        )
        app.add_route(
            detokenize, f"{prefix}/detokenize", methods=["POST"], name=f"detokenize{prefix.replace('/', '_')}"
        )
    app.add_route(score, "/v1/score", methods=["POST"])
    app.add_route(pause_generation, "/pause_generation", methods=["POST"])
    app.add_route(continue_generation, "/continue_generation", methods=["POST"])
    app.add_route(update_weights_from_tensor, "/update_weights_from_tensor", methods=["POST"], stream=True)
    app.add_route(update_weight_version, "/update_weight_version", methods=["POST"])
    app.add_route(get_weight_version, "/get_weight_version", methods=["GET"])
    app.add_route(weights_checker, "/weights_checker", methods=["POST"])
