"""The parent side of the compile worker: spawn it, relay its log, wait for it.

The server's background compile (graph_runner.warm_up_in_background) must not trace in the
process that serves meanwhile (module_call_lock.py), and a compile in a thread of the serving
process also fights the scheduler for the GIL (a 6-token request took 35 s while compiling). So
the parent first runs compile_worker.py in a child process: it builds the same model with the same
shapes (the parent's KV pool size and request limits, passed explicitly) and compiles both shape
families, which writes Dynamo's graphs through AOTAutograd's and Inductor's on-disk caches
(TORCHINDUCTOR_CACHE_DIR). The parent then compiles in-process, holding the module-call lock, and
finds every graph in the cache: seconds instead of minutes.

The child is `python -m research_rt.executor.compile_worker` (its own module: it imports the
model runner, which imports this one).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
from typing import Any

from research_rt.server_args import ServerArgs

logger = logging.getLogger(__name__)

CHILD_LOG_PREFIX = "[compile worker] "


def child_args(args: ServerArgs, max_total_tokens: int, max_running_requests: int) -> dict[str, Any]:
    """The JSON the child builds its runner from: the parent's args with the pool fixed to the
    parent's (its size is a static shape of the compiled graphs) and compile in the foreground."""
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerArgs) if f.name != "extra"}
    fields.update(
        max_total_tokens=max_total_tokens,
        max_running_requests=max_running_requests,
        enable_torch_compile=True,
        disable_torch_compile=False,
        disable_background_compile=True,
    )
    return fields


def compile_in_child(
    args: ServerArgs, max_total_tokens: int, max_running_requests: int, stop: threading.Event
) -> bool:
    """Run the child and wait for it (killing it if `stop` is set); its log lines are relayed at
    debug level. Whether it compiled both shape families."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "research_rt.executor.compile_worker", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(child_args(args, max_total_tokens, max_running_requests)))
    proc.stdin.close()
    tail: list[str] = []

    def relay() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip())
            del tail[:-20]
            logger.debug("%s%s", CHILD_LOG_PREFIX, line.rstrip())

    reader = threading.Thread(target=relay, daemon=True, name="research_rt-compile-log")
    reader.start()
    while proc.poll() is None:
        if stop.wait(0.2):
            proc.kill()
            proc.wait()
            return False
    reader.join(5)
    if proc.returncode != 0:
        logger.warning(
            "The compile worker exited with %s; compiling in this process instead. Its last lines:\n%s",
            proc.returncode,
            "\n".join(tail),
        )
        return False
    return True
