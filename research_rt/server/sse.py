"""The one server-sent-events driver behind every streaming route (native `/generate` and the
OpenAI completions and chat streams).

The first engine event is awaited before the response starts, so a validation error still
answers as an ordinary HTTP 4xx JSON error. After that, each event becomes zero or more `data:`
lines (the route's `render`); an error mid-stream becomes one `data: {"error": ...}` line
(`render_error`); the stream always ends with `data: [DONE]`. Closing the engine's generator
(client gone, error, or the end) aborts whatever is still running.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from sanic import Request

from research_rt.core.errors import RequestError
from research_rt.engine.collector import GenerateEvent

SSE_DONE = "data: [DONE]\n\n"


def sse(data: Any) -> str:
    """One server-sent event: `data: <compact json>\\n\\n`."""
    return "data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n\n"


async def stream_events(
    request: Request,
    events: AsyncIterator[GenerateEvent],
    render: Callable[[GenerateEvent], list[Any]],
    render_error: Callable[[RequestError], Any],
    finish: Callable[[], list[Any]] | None = None,
) -> None:
    """Drive one stream. `render(event)` returns the payloads to send for an event (it may raise
    RequestError to end the stream with an error); `finish()` the payloads after the last event."""
    async with contextlib.aclosing(events) as stream:
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        response = await request.respond(
            content_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        try:
            if first is not None:
                for payload in render(first):
                    await response.send(sse(payload))
            async for event in stream:
                for payload in render(event):
                    await response.send(sse(payload))
            for payload in finish() if finish is not None else []:
                await response.send(sse(payload))
        except RequestError as e:
            await response.send(sse(render_error(e)))
        await response.send(SSE_DONE)
        await response.eof()
