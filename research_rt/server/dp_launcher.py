"""Data parallelism: `launch_server --dp-size N` runs N research_rt servers behind sglang-router.

Each worker is a whole research_rt server (its own process, model copy, scheduler and radix cache)
with `--dp-size 1`, bound to a free port on 127.0.0.1. The CPUs this process may use are split into
N disjoint sets: worker i is pinned to set i (`sched_setaffinity`) and runs that many torch threads
(`OMP_NUM_THREADS`); on CUDA, worker i sees only GPU i (`CUDA_VISIBLE_DEVICES`) when there are N.
Once every worker answers `GET /health` with 200 (after its warm-up), sglang-router starts on the
requested --host/--port with `--policy cache_aware` (requests sharing a prefix go to the worker that
holds it) and the worker URLs; when it has registered them all, this logs `The server is fired up and
ready to roll!`.

One Ctrl-C (or SIGTERM) stops the router, then the workers. Children run in their own sessions (a
terminal's Ctrl-C reaches only this process, which stops them in order) and get SIGTERM if this
process dies. A worker that exits on its own is reported and removed from the router at once; the
others keep serving. If the router exits, or the last worker, everything stops with exit status 1.

Extra router flags can be given in the environment variable RESEARCH_RT_ROUTER_ARGS (shell-split,
appended last, so they override ours: e.g. `--policy power_of_two`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
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


def _spawn(argv: list[str], env: dict[str, str], cpus: list[int] | None, prefix: str) -> subprocess.Popen:
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


def router_argv(args: ServerArgs, urls: list[str], prometheus_port: int) -> list[str]:
    level = {"debug": "debug", "info": "warn", "warning": "warn"}.get(args.log_level.lower(), "error")
    argv = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--worker-urls",
        *urls,
        "--policy",
        "cache_aware",
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(prometheus_port),
        "--log-level",
        level,
        "--health-check-interval-secs",
        "10",
        "--shutdown-grace-period-secs",
        "10",
        "--retry-initial-backoff-ms",
        "100",
    ]
    if args.api_key:
        argv += ["--api-key", args.api_key]
    return argv + shlex.split(os.environ.get(ROUTER_ARGS_ENV, ""))


def _router_headers(args: ServerArgs) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def router_workers(base: str, headers: dict[str, str] | None = None) -> list[dict]:
    """The router's `GET /workers` list (url, is_healthy, load, ...)."""
    req = urllib.request.Request(base + "/workers", headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())["workers"]


def wait_for_router(
    router: subprocess.Popen, base: str, urls: list[str], headers: dict[str, str], timeout: float = 120.0
) -> None:
    """Until the router lists every worker as healthy (it registers them in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        if router.poll() is not None:
            raise StartupError(f"sglang-router exited with code {router.returncode} while starting.")
        try:
            healthy = {w["url"] for w in router_workers(base, headers) if w.get("is_healthy")}
            if healthy >= set(urls):
                return
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise StartupError(f"sglang-router did not register the workers within {timeout:.0f} s.")
        time.sleep(POLL_INTERVAL)


def remove_from_router(base: str, worker: Worker, headers: dict[str, str]) -> None:
    """Deregister a dead worker (`DELETE /workers/{id}`) so the router stops sending to it now
    instead of after its health checks fail."""
    try:
        ids = [w["id"] for w in router_workers(base, headers) if w.get("url") == worker.url]
        for wid in ids:
            req = urllib.request.Request(
                f"{base}/workers/{urllib.parse.quote(str(wid), safe='')}", method="DELETE", headers=headers
            )
            urllib.request.urlopen(req, timeout=5).read()
    except (OSError, ValueError, KeyError) as e:
        logger.warning("Could not remove DP worker %d from the router: %s", worker.rank, e)


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_all(router: subprocess.Popen | None, workers: list[Worker]) -> None:
    """The router first (no new requests reach stopping workers), then every worker at once."""
    if router is not None:
        _stop(router, 15)
    for w in workers:
        if w.process.poll() is None:
            w.process.terminate()
    for w in workers:
        _stop(w.process, 20)


def _cuda_devices(n: int) -> list[str | None]:
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = (
        [d for d in visible.split(",") if d]
        if visible
        else [str(i) for i in range(torch.cuda.device_count())]
    )
    if len(ids) < n:
        logger.warning("%d DP workers share %d GPU(s).", n, len(ids))
        return [None] * n
    return ids[:n]


def run_data_parallel(args: ServerArgs) -> int:
    """Start the workers and the router, serve until stopped; the exit status."""
    from research_rt.loader.resolve import ModelNotFoundError, resolve_model_path

    n = args.dp_size
    try:  # once, here: every worker then loads (and reports as served_model_name) the same path
        args = args.replace(model_path=resolve_model_path(args.model_path).path)
    except ModelNotFoundError as e:
        logger.error("Cannot load the model: %s", e)
        return 1
    cpus = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    cpu_sets = split_cpus(cpus, n)
    gpus = _cuda_devices(n) if args.device == "cuda" else [None] * n

    stopping = threading.Event()

    def on_sigterm(signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    workers: list[Worker] = []
    router: subprocess.Popen | None = None
    status = 0
    try:
        for rank in range(n):
            port = free_port()
            threads = len(cpu_sets[rank])
            proc = _spawn(
                worker_argv(args, port), worker_env(threads, gpus[rank]), cpu_sets[rank], f"[dp{rank}] "
            )
            workers.append(Worker(rank, port, cpu_sets[rank], proc))
            logger.info(
                "DP worker %d: pid %d, http://127.0.0.1:%d, cpus %s, %d thread(s)%s",
                rank,
                proc.pid,
                port,
                cpu_sets[rank],
                threads,
                f", GPU {gpus[rank]}" if gpus[rank] is not None else "",
            )
        wait_for_workers(workers)
        urls = [w.url for w in workers]
        router = _spawn(router_argv(args, urls, free_port()), dict(os.environ), None, "[router] ")
        connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        base = f"http://{connect_host}:{args.port}"
        headers = _router_headers(args)
        wait_for_router(router, base, urls, headers)
        logger.info(
            "sglang-router (pid %d) serves on http://%s:%d, policy cache_aware",
            router.pid,
            args.host,
            args.port,
        )
        logger.info(READY_TEXT)
        status = supervise(router, workers, base, headers, stopping)
    except StartupError as e:
        logger.error("%s", e)
        status = 1
    except KeyboardInterrupt:
        logger.info(
            "Stopping the router and %d DP worker(s).", sum(w.process.poll() is None for w in workers)
        )
    finally:
        stopping.set()
        stop_all(router, workers)
    return status


def supervise(
    router: subprocess.Popen,
    workers: list[Worker],
    base: str,
    headers: dict[str, str],
    stopping: threading.Event,
) -> int:
    """Watch the children until one of them ends the service; the exit status.

    One thread per worker waits on its process, so a crashed worker leaves the router within
    milliseconds: the router retries a failed request (backoff from 100 ms), and its retries then
    pick a live worker instead of exhausting themselves on the dead one."""
    changed = threading.Event()

    def watch(w: Worker) -> None:
        code = w.process.wait()
        if stopping.is_set():
            return
        logger.error(
            "DP worker %d (%s, pid %d) exited with code %d; removing it from the router.",
            w.rank,
            w.url,
            w.process.pid,
            code,
        )
        remove_from_router(base, w, headers)
        w.alive = False
        changed.set()

    for w in workers:
        threading.Thread(target=watch, args=(w,), daemon=True, name=f"watch-dp{w.rank}").start()
    while not stopping.is_set():
        changed.wait(POLL_INTERVAL)
        changed.clear()
        if router.poll() is not None:
            logger.error("sglang-router exited with code %d; stopping the DP workers.", router.returncode)
            return 1
        if not any(w.alive for w in workers):
            logger.error("Every DP worker has exited; stopping the router.")
            return 1
    return 0
