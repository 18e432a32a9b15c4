"""The loop both schedulers run on their thread: step while there is work, else wait on the inbox."""

from __future__ import annotations

import logging
import queue
import threading

import torch

logger = logging.getLogger("research_rt.scheduler")

INTERNAL_ERROR = "Internal error in the scheduler; see the server log."


class SchedulerLoop:
    """Mixin: needs `step() -> bool`, `inbox`, `_handle(item)` and `_fail_all(message)`."""

    @torch.inference_mode()
    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                worked = self.step()
            except Exception:  # never let the loop die silently: fail every request
                logger.exception("Scheduler step failed")
                self._fail_all(INTERNAL_ERROR)
                worked = False
            if not worked:
                try:
                    item = self.inbox.get(timeout=0.05)
                except queue.Empty:
                    continue
                self._handle(item)
