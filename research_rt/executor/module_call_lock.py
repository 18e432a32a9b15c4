"""One process-wide lock around model calls while Inductor may be tracing in another thread.

While it lowers a graph, Inductor traces small helper functions with `torch.fx` (`loop_body.py`),
and `torch.fx.Tracer.trace` patches `torch.nn.Module.__call__` (and `__getattr__`) on the class,
for every thread of the process. An eager forward that runs meanwhile in another thread goes
through the tracer's wrapper and fails (`NameError: module is not installed as a submodule`): seen
as a failed scheduler step while the decode step compiled in the background.

So every scheduler iteration (which calls the model) holds `MODULE_CALLS`, and so does the
compile backend (`inductor_under_lock`: AOTAutograd's tracing and Inductor's lowering, where the
patching happens). Dynamo's own bytecode tracing patches nothing and runs unlocked, beside the
eager steps. The background compile keeps its locked part short by first compiling in a child
process (compile_process.py), which fills the on-disk caches, so that the backend here only loads
the built graphs (measured: 1.3 s of a 15 s warm compile of SmolLM2's decode step; the rest is
Dynamo tracing).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class ModuleCallLock:
    """A reentrant lock whose `priority()` side is served before plain `with` holders that come
    back for it in a loop. The scheduler loop takes it once per iteration and a plain lock is not
    fair: a busy loop re-took it at once every time, and a cold compile waiting for it did not
    finish in 10 minutes (tests/executor/test_compile_worker.py). A priority holder first closes a
    gate that plain holders pass through, so the loop stops at its next iteration."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._gate = threading.Lock()
        self._owner: int | None = None  # read unlocked: only ever compared with one's own ident
        self._depth = 0

    def _held_here(self) -> bool:
        return self._owner == threading.get_ident()

    def _enter(self) -> None:
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._depth += 1

    def __enter__(self) -> ModuleCallLock:
        if not self._held_here():
            with self._gate:  # waits while a priority holder is queued or holds the lock
                pass
        self._enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
        self._lock.release()

    @contextmanager
    def priority(self) -> Iterator[None]:
        if self._held_here():  # e.g. the scheduler's own step compiling the verify step
            with self:
                yield
            return
        with self._gate:
            self._enter()
        try:
            yield
        finally:
            self.__exit__()


MODULE_CALLS = ModuleCallLock()


def inductor_under_lock(
    gm: torch.fx.GraphModule, example_inputs: list[Any], config_patches: dict | None = None
) -> Callable[..., Any]:
    """torch.compile's default backend (Inductor, with `config_patches` applied to its config), run
    holding `MODULE_CALLS` (ahead of the scheduler loop)."""
    from torch._inductor.compile_fx import compile_fx

    with MODULE_CALLS.priority():
        return compile_fx(gm, example_inputs, config_patches=config_patches or None)
