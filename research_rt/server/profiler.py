"""`/start_profile` and `/stop_profile` (engine/profiler.py does the work). Body (optional):
`{"output_dir": str, "num_steps": int, "activities": [...]}`; default dir: $SGLANG_TORCH_PROFILER_DIR
or /tmp."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse, text

from research_rt.core.errors import RequestError
from research_rt.server.protocol import parse_json


async def _in_thread(fn: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn)


def register(app: Sanic) -> None:
    async def start_profile(request: Request) -> HTTPResponse:
        engine = request.app.ctx.state.engine
        body = parse_json(request.body, required=False)
        output_dir = body.get("output_dir") or os.environ.get("SGLANG_TORCH_PROFILER_DIR", "/tmp")
        num_steps = body.get("num_steps")
        activities = body.get("activities") or ["CPU", "GPU"]
        if not isinstance(output_dir, str):
            raise RequestError("Field 'output_dir' must be a string.")
        if num_steps is not None and (
            not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1
        ):
            raise RequestError("Field 'num_steps' must be a positive integer.")
        if not isinstance(activities, list) or not all(isinstance(a, str) for a in activities):
            raise RequestError("Field 'activities' must be a list of strings.")
        await _in_thread(lambda: engine.start_profile(output_dir, num_steps, activities))
        return text("Start profiling.\n")

    async def stop_profile(request: Request) -> HTTPResponse:
        engine = request.app.ctx.state.engine
        await _in_thread(engine.stop_profile)
        return text("Stop profiling. This will take some time.\n")

    app.add_route(start_profile, "/start_profile", methods=["GET", "POST"])
    app.add_route(stop_profile, "/stop_profile", methods=["GET", "POST"])
