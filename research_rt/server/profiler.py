"""`/start_profile` and `/stop_profile`: a torch.profiler trace of the scheduler thread.

The profiler is started and stopped on the scheduler thread (between steps), so it records the
forward passes. Body (optional): `{"output_dir": str, "num_steps": int, "activities": [...]}`;
the trace is written as `<output_dir>/<time>.trace.json` (default dir: $SGLANG_TORCH_PROFILER_DIR
or /tmp). With `num_steps` the profile stops by itself after that many scheduler steps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import torch
from sanic import Request, Sanic
from sanic.response import HTTPResponse, text

from research_rt.engine.io_struct import RequestError
from research_rt.server.protocol import parse_json

logger = logging.getLogger("research_rt.server")


class SchedulerProfiler:
    """State kept on the scheduler thread: the active profiler, where to write, steps left."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.prof: torch.profiler.profile | None = None
        self.output_dir = ""
        self.steps_left: int | None = None
        engine.scheduler.step_hooks.append(self._on_step)

    def start(self, output_dir: str, num_steps: int | None, activities: list[str]) -> None:
        if self.prof is not None:
            raise RequestError("Profiling is already in progress. Call /stop_profile first.")
        kinds = {"CPU": torch.profiler.ProfilerActivity.CPU}
        if torch.cuda.is_available():
            kinds["GPU"] = torch.profiler.ProfilerActivity.CUDA
        unknown = [a for a in activities if a not in ("CPU", "GPU", "MEM", "CUDA_PROFILER")]
        if unknown:
            raise RequestError(f"Unknown profiler activities: {unknown}.")
        os.makedirs(output_dir, exist_ok=True)
        self.prof = torch.profiler.profile(
            activities=[kinds[a] for a in activities if a in kinds] or [kinds["CPU"]],
            with_stack=True,
            profile_memory="MEM" in activities,
        )
        self.prof.start()
        self.output_dir, self.steps_left = output_dir, num_steps
        logger.info("Profiling starts. Traces will be saved to: %s", output_dir)

    def stop(self) -> str:
        if self.prof is None:
            raise RequestError("Profiling is not in progress. Call /start_profile first.")
        prof, self.prof = self.prof, None
        prof.stop()
        path = os.path.join(self.output_dir, f"{time.time()}.trace.json")
        prof.export_chrome_trace(path)
        logger.info("Profiling done. Trace saved to: %s", path)
        return path

    def _on_step(self, _scheduler: Any) -> None:
        if self.prof is not None and self.steps_left is not None:
            self.steps_left -= 1
            if self.steps_left <= 0:
                self.stop()


async def _in_scheduler(engine: Any, fn: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, lambda: engine.call_in_scheduler(fn))


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
        prof = request.app.ctx.profiler
        await _in_scheduler(engine, lambda: prof.start(output_dir, num_steps, activities))
        return text("Start profiling.\n")

    async def stop_profile(request: Request) -> HTTPResponse:
        engine = request.app.ctx.state.engine
        prof = request.app.ctx.profiler
        await _in_scheduler(engine, prof.stop)
        return text("Stop profiling. This will take some time.\n")

    app.ctx.profiler = SchedulerProfiler(app.ctx.state.engine)
    app.add_route(start_profile, "/start_profile", methods=["GET", "POST"])
    app.add_route(stop_profile, "/stop_profile", methods=["GET", "POST"])
