"""The Sanic application: routes from native.py / openai.py, API key, CORS, JSON errors.

`create_app(state)` builds the app around a running Engine (wrapped in a `ServerState`). Every
error a handler raises becomes JSON: `RequestError` -> its status (400 by default) with
`{"error": {"message": ...}}`; Sanic's 404 / 405 / 413 likewise; anything else is logged and
answered 500 (a bug in research_rt, never a client mistake).
"""

from __future__ import annotations

import logging
import uuid

from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, empty, json

from research_rt.core.errors import RequestError
from research_rt.server.protocol import error_body, openai_error_body
from research_rt.server.state import ServerState

logger = logging.getLogger("research_rt.server")

# The largest request body accepted (413 above it): room for e.g. 512 prompts of 8k token ids;
# parsing this much JSON takes about a second of the event loop on a slow CPU.
MAX_BODY_BYTES = 32 << 20

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "*",
    "Access-Control-Allow-Headers": "*",
}


def create_app(state: ServerState, name: str | None = None) -> Sanic:
    """A Sanic app serving `state.engine`; run it with `single_process=True` (one engine thread)."""
    from research_rt.server import info, metrics, native, openai, profiler, research_api

    app = Sanic(name or f"research_rt_{uuid.uuid4().hex[:8]}", configure_logging=False)
    app.ctx.state = state
    app.config.RESPONSE_TIMEOUT = 24 * 3600  # long generations are fine; disconnects abort them
    app.config.KEEP_ALIVE_TIMEOUT = 5
    app.config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
    app.config.TOUCHUP = False
    app.config.MOTD = False
    native.register(app)
    info.register(app)
    openai.register(app)
    profiler.register(app)
    research_api.register(app)  # tokenize, score, RL refit (SGLang 0.5's endpoints)
    if state.server_args.enable_metrics:
        metrics.register(app)

    api_key = state.server_args.api_key

    @app.on_request(priority=10)
    async def _auth_and_cors(request: Request) -> HTTPResponse | None:
        if request.method == "OPTIONS":
            return empty(status=204, headers=CORS_HEADERS)
        if api_key and not request.path.startswith("/health"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return json({"error": "Unauthorized"}, status=401, headers=CORS_HEADERS)
        return None

    @app.on_response
    async def _cors(request: Request, response: HTTPResponse) -> None:
        for k, v in CORS_HEADERS.items():
            response.headers.setdefault(k, v)

    app.error_handler.add(Exception, _handle_error)
    return app


def _handle_error(request: Request, exc: Exception) -> HTTPResponse:
    openai_route = request.path.startswith("/v1/") if request is not None else False
    if isinstance(exc, RequestError):
        status, message = exc.status_code, exc.message
    elif isinstance(exc, SanicException):
        status = exc.status_code
        message = str(exc) or type(exc).__name__
        if status == 404:
            message = f"Not Found: {request.method} {request.path}" if request is not None else "Not Found"
        elif status == 413:
            message = f"Payload Too Large: the request body may be at most {MAX_BODY_BYTES} bytes."
        elif status == 405:
            message = (
                f"Method Not Allowed: {request.method} {request.path}" if request is not None else str(exc)
            )
        headers = dict(getattr(exc, "headers", None) or {})
        body = openai_error_body(message, status) if openai_route else error_body(message)
        return json(body, status=status, headers=headers)
    else:
        logger.exception("Internal error while serving %s", getattr(request, "path", "?"))
        status, message = 500, f"Internal server error: {type(exc).__name__}: {exc}"
    return json(openai_error_body(message, status) if openai_route else error_body(message), status=status)
