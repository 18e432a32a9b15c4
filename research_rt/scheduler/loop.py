"""What both schedulers share: the inbox of typed messages and the loop on the scheduler thread."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from research_rt.core.messages import (
    AbortReq,
    AddReq,
    CallInScheduler,
    ContinueGeneration,
    FlushCache,
    PauseGeneration,
    SchedulerMessage,
)
from research_rt.core.req import Req
from research_rt.executor.module_call_lock import MODULE_CALLS

logger = logging.getLogger("research_rt.scheduler")

INTERNAL_ERROR = "Internal error in the scheduler; see the server log."


class SchedulerLoop:
    """Base of `Scheduler` and `EncoderScheduler`. Subclasses implement `step() -> bool` (whether it
    did any work; nothing while `paused`), `add_request`, `abort`, `flush_cache` and `fail_all`,
    and for pausing `retract_running` and `reap_aborted`."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[SchedulerMessage] = queue.Queue()
        self.step_hooks: list[Callable[[Any], None]] = []  # called after every step (tests, studies)
        self.paused: str | None = None  # the PauseGeneration mode while paused

    def step(self) -> bool:
        raise NotImplementedError

    def add_request(self, req: Req) -> None:
        raise NotImplementedError

    def abort(self, rid: str | None) -> None:
        """Abort one request (None: all); each ends with finish reason `abort`."""
        raise NotImplementedError

    def flush_cache(self) -> bool:
        raise NotImplementedError

    def fail_all(self, message: str) -> None:
        """End every request with an internal error (after a step raised) and reset the caches."""
        raise NotImplementedError

    def retract_running(self) -> None:
        """Move every running (and chunked) request back to the queue, freeing its KV slots."""
        raise NotImplementedError

    def reap_aborted(self) -> None:
        """End at once the running requests marked for abort (between steps their KV is consistent)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- pause
    def pause(self, mode: str) -> None:
        """PauseGeneration (core/messages.py has the modes); pausing again applies the new mode."""
        if mode == "abort":
            self.abort(None)
            self.reap_aborted()
        elif mode == "retract":
            self.retract_running()
        logger.info("Generation paused (mode=%s).", mode)
        self.paused = mode

    def resume(self) -> bool:
        was, self.paused = self.paused, None
        if was:
            logger.info("Generation continued.")
        return was is not None

    # ---------------------------------------------------------------- messages
    def drain_inbox(self) -> None:
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return
            self.handle(msg)

    def handle(self, msg: SchedulerMessage) -> None:
        if isinstance(msg, AddReq):
            self.add_request(msg.req)
        elif isinstance(msg, AbortReq):
            self.abort(msg.rid)
        elif isinstance(msg, FlushCache):
            msg.reply.set_result(self.flush_cache())
        elif isinstance(msg, PauseGeneration):
            msg.reply.set_result(self.pause(msg.mode))
        elif isinstance(msg, ContinueGeneration):
            msg.reply.set_result(self.resume())
        elif isinstance(msg, CallInScheduler):
            try:
                msg.reply.set_result(msg.fn())
            except Exception as e:  # noqa: BLE001 - handed back to the caller
                msg.reply.set_exception(e)
        else:
            raise TypeError(f"unknown scheduler message {msg!r}")

    def run_step_hooks(self) -> None:
        for hook in self.step_hooks:
            hook(self)

    # ---------------------------------------------------------------- the loop
    @torch.inference_mode()
    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with MODULE_CALLS:  # not while a compile traces (executor/module_call_lock.py)
                    worked = self.step()
            except Exception:  # never let the loop die silently: fail every request
                logger.exception("Scheduler step failed")
                self.fail_all(INTERNAL_ERROR)
                worked = False
            if not worked:
                try:
                    msg = self.inbox.get(timeout=0.05)
                except queue.Empty:
                    continue
                with MODULE_CALLS:
                    self.handle(msg)
