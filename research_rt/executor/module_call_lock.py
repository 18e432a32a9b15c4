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
from collections.abc import Callable
from typing import Any

import torch

MODULE_CALLS = threading.RLock()


def inductor_under_lock(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """torch.compile's default backend (Inductor), run holding `MODULE_CALLS`."""
    from torch._inductor.compile_fx import compile_fx

    with MODULE_CALLS:
        return compile_fx(gm, example_inputs)
