"""The N research_rt worker servers of `--dp-size N`: ports, CPU sets, environments, spawning,
and waiting until each answers /health (see the package docstring)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from research_rt.server_args import ServerArgs

logger = logging.getLogger("research_rt.dp")

READY_TEXT = "The server is fired up and ready to roll!"
ROUTER_ARGS_ENV = "RESEARCH_RT_ROUTER_ARGS"
WORKER_STARTUP_TIMEOUT = 1800.0  # seconds; a cold torch.compile on a shared core takes minutes
POLL_INTERVAL = 0.5
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# the worker-side fields the launcher sets itself
LAUNCHER_FIELDS = ("extra", "host", "port", "dp_size", "model_path")


@dataclass
class Worker:
    rank: int
    port: int
    cpus: list[int]
    process: subprocess.Popen
    alive: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class StartupError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_cpus(cpus: list[int], n: int) -> list[list[int]]:
    """N disjoint, contiguous, near-equal CPU sets (contiguous ids share a socket / L3 on typical
    hosts); with fewer CPUs than workers, workers share CPUs round-robin."""
    cpus = sorted(cpus)
    if len(cpus) < n:
        return [[cpus[i % len(cpus)]] for i in range(n)]
    base, extra = divmod(len(cpus), n)
    sets, start = [], 0
    for i in range(n):
        size = base + (i < extra)
        sets.append(cpus[start : start + size])
        start += size
    return sets


def worker_argv(args: ServerArgs, port: int) -> list[str]:
    """The launch_server command line of one worker: the same settings as `args` (every field that
    differs from its default, so resolved values such as the random seed are shared), dp_size 1,
    on 127.0.0.1:port."""
    argv = [sys.executable, "-m", "research_rt.launch_server", "--host", "127.0.0.1", "--port", str(port)]
    if args.model_path is not None:
        argv += ["--model-path", args.model_path]
    for f in dataclasses.fields(ServerArgs):
        if f.name in LAUNCHER_FIELDS:
            continue
        value = getattr(args, f.name)
        if value is None or (f.default is not dataclasses.MISSING and value == f.default):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            if value:  # every boolean flag is store_true
                argv.append(flag)
            continue
        argv += [flag, str(value)]
    return argv


def worker_env(threads: int, gpu: str | None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def _child_setup(cpus: list[int] | None) -> Callable[[], None]:
    """Runs in the child between fork and exec: pin it to `cpus`; have the kernel SIGTERM it when
    this process dies (Linux). Nothing is imported there (other threads may hold import locks)."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    pdeathsig, sigterm = 1, int(signal.SIGTERM)  # PR_SET_PDEATHSIG

    def setup() -> None:
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpus)
        if prctl is not None:
            prctl(pdeathsig, sigterm)

    return setup


def _pump(stream, prefix: str) -> None:  # noqa: ANN001 - a text pipe
    """Copy a child's output to ours, line by line, with a prefix (workers' own readiness lines are
    reworded: the data-parallel server is ready only once the router is)."""
    for line in stream:
        line = ANSI.sub("", line.rstrip("\n"))
        if READY_TEXT in line:
            line = line.replace(READY_TEXT, "warmed up and ready")
        sys.stdout.write(f"{prefix}{line}\n")
        sys.stdout.flush()


def spawn(argv: list[str], env: dict[str, str], cpus: list[int] | None, prefix: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
        preexec_fn=_child_setup(cpus),
    )
    threading.Thread(target=_pump, args=(proc.stdout, prefix), daemon=True, name=f"pump{prefix}").start()
    return proc


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def wait_for_workers(workers: list[Worker], timeout: float = WORKER_STARTUP_TIMEOUT) -> None:
    """Until every worker's /health answers 200; StartupError if one exits or time runs out."""
    deadline = time.monotonic() + timeout
    pending = {w.rank: w for w in workers}
    while pending:
        for rank, w in list(pending.items()):
            if w.process.poll() is not None:
                raise StartupError(
                    f"DP worker {rank} exited with code {w.process.returncode} while starting."
                )
            try:
                status, _ = _get(w.url + "/health")
            except OSError:  # not listening yet
                continue
            if status == 200:
                logger.info("DP worker %d is ready at %s (cpus %s)", rank, w.url, w.cpus)
                del pending[rank]
        if pending and time.monotonic() > deadline:
            raise StartupError(f"DP workers {sorted(pending)} were not ready after {timeout:.0f} s.")
        time.sleep(POLL_INTERVAL)
