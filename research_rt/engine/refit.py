"""The Engine's RL weight refit API (SGLang 0.5's): pause and continue generation, update weights
from tensors, the weight version, and the weights checker. A mixin of `Engine`.

A trainer typically: `pause_generation("retract")` (or "in_place" to keep the KV of running
requests, or "abort"), `update_weights_from_tensor(...)` one bucket after another,
`update_weight_version("step-42")`, `continue_generation()`. Requests sent while paused are queued
and run after `continue_generation`; they do not fail. Every response's `meta_info` carries the
`weight_version` current when it was built.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from research_rt.core.errors import RequestError
from research_rt.core.messages import PAUSE_MODES, ContinueGeneration, PauseGeneration
from research_rt.engine.weights import update_weights_from_tensor_on_scheduler
from research_rt.engine.weights_checker import WeightsChecker


class RefitMixin:
    """Needs the Engine's `scheduler`, `runner`, `weight_version`, `abort_request` and
    `call_in_scheduler`."""

    _checker: WeightsChecker | None = None

    # ---------------------------------------------------------------- pause
    def pause_generation(self, mode: str = "abort") -> None:
        """Stop generating (core/messages.py `PauseGeneration` has the modes); returns once the
        mode took effect (aborted requests have ended, retracted ones freed their KV)."""
        if mode not in PAUSE_MODES:
            raise RequestError(f"Field 'mode' must be one of {', '.join(PAUSE_MODES)}, got {mode!r}.")
        msg = PauseGeneration(mode)
        self.scheduler.inbox.put(msg)
        msg.reply.result()

    def continue_generation(self) -> bool:
        """Resume after `pause_generation`; whether generation was paused."""
        msg = ContinueGeneration()
        self.scheduler.inbox.put(msg)
        return bool(msg.reply.result())

    @property
    def paused(self) -> str | None:
        """The pause mode while paused, else None."""
        return self.scheduler.paused

    # ---------------------------------------------------------------- versions
    def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> None:
        if not isinstance(new_version, str) or not new_version:
            raise RequestError("Field 'new_version' (a non-empty string) is required.")
        if abort_all_requests:
            self.abort_request(None)
        self.weight_version = new_version

    # ---------------------------------------------------------------- weights
    def update_weights_from_tensor(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        load_format: str | None = None,
        flush_cache: bool = True,
        weight_version: str | None = None,
    ) -> tuple[bool, str]:
        """Copy named tensors into the running model (engine/weights.py): checkpoint names, or the
        runtime's own parameter names with load_format "direct"; rolled back on failure. On
        success `weight_version` (when given) becomes the engine's. (success, message)."""
        named = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        for i, pair in enumerate(named):
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise RequestError(f"named_tensors[{i}] must be a (name, tensor) pair.")
            if not isinstance(pair[1], torch.Tensor):
                raise RequestError(f"named_tensors[{i}] ({pair[0]}) is not a tensor.")
        ok, message = self.call_in_scheduler(
            lambda: update_weights_from_tensor_on_scheduler(self, named, load_format, flush_cache)
        )
        if ok and weight_version is not None:
            self.weight_version = weight_version
            message += f" Weight version updated to {weight_version}."
        return ok, message

    def check_weights(self, action: str = "checksum") -> tuple[bool, str, dict[str, Any] | None]:
        """The weights checker (engine/weights_checker.py): (success, message, the checksums for
        action "checksum", else None)."""
        if self._checker is None:
            self._checker = WeightsChecker()
        checker = self._checker

        def run() -> tuple[bool, str, dict[str, Any] | None]:
            result = checker.handle(self.runner.model, action, self.runner.update_weights_from_tensors)
            if action == "reset_tensors":
                self.scheduler.flush_cache()  # its KV came from the old weights (skipped if busy)
            return result

        return self.call_in_scheduler(run)
