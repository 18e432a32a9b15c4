"""A torch.profiler trace of the scheduler thread (`Engine.start_profile` / `stop_profile`).

The profiler is started and stopped on the scheduler thread (between steps), so it records the
forward passes; the trace is written as `<output_dir>/<time>.trace.json`. With `num_steps` the
profile stops by itself after that many scheduler steps.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from research_rt.core.errors import RequestError

logger = logging.getLogger("research_rt.engine")

ACTIVITIES = ("CPU", "GPU", "MEM", "CUDA_PROFILER")


class SchedulerProfiler:
    """State kept on the scheduler thread: the active profiler, where to write, steps left."""

    def __init__(self) -> None:
        self.prof: torch.profiler.profile | None = None
        self.output_dir = ""
        self.steps_left: int | None = None

    def start(self, output_dir: str, num_steps: int | None, activities: list[str]) -> None:
        if self.prof is not None:
            raise RequestError("Profiling is already in progress. Call /stop_profile first.")
        kinds = {"CPU": torch.profiler.ProfilerActivity.CPU}
        if torch.cuda.is_available():
            kinds["GPU"] = torch.profiler.ProfilerActivity.CUDA
        unknown = [a for a in activities if a not in ACTIVITIES]
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

    def on_step(self, _scheduler: Any) -> None:
        if self.prof is not None and self.steps_left is not None:
            self.steps_left -= 1
            if self.steps_left <= 0:
                self.stop()
