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
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from research_rt.server_args import ServerArgs

logger = logging.getLogger(__name__)

CHILD_LOG_PREFIX = "[compile worker] "
NOT_IN_GRAPH = {"random_seed", "host", "port", "api_key", "log_level", "log_level_http", "served_model_name"}
PACKAGE_DIR = Path(__file__).resolve().parents[1]


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


def warm_marker(fields: dict[str, Any]) -> Path:
    """The file the child leaves in Inductor's cache directory once it has compiled for these
    args, this torch, this thread count and this research_rt source (sizes and mtimes of its .py
    files: a researcher who edits a model gets a fresh compile in the child, not a cold one under
    the lock). A warm start skips the child (measured: it re-traced for 53 s before the parent's
    32 s of tracing). The thread count is in the key because Inductor's generated code, and so its
    cache, depends on it: a `--dp-size 2` worker (1 thread) found the marker of a 2-thread server,
    skipped the child, and compiled its batch-2+ graph under the lock for 80 s, answering nothing."""
    import torch
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in fields.items() if k not in NOT_IN_GRAPH}, sort_keys=True).encode())
    h.update(f"{torch.__version__} threads={torch.get_num_threads()}".encode())
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(PACKAGE_DIR)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return Path(cache_dir()) / "research_rt_compiled" / f"{h.hexdigest()[:24]}.done"


def compile_in_child(
    args: ServerArgs, max_total_tokens: int, max_running_requests: int, stop: threading.Event
) -> bool:
    """Run the child and wait for it (killing it if `stop` is set); its log lines are relayed at
    debug level. Whether the caches are warm: the child compiled both shape families, now or on
    an earlier start with the same marker."""
    fields = child_args(args, max_total_tokens, max_running_requests)
    marker = warm_marker(fields)
    if marker.exists():
        logger.info("The compile caches are warm for this model and source; no compile worker")
        return True
    proc = subprocess.Popen(
        [sys.executable, "-m", "research_rt.executor.compile_worker", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(fields))
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
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True
