"""`--dp-size N`: the router in front of the workers, start-up in order, supervision and shutdown
(see the package docstring)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from research_rt.data_parallel.workers import (
    POLL_INTERVAL,
    READY_TEXT,
    ROUTER_ARGS_ENV,
    StartupError,
    Worker,
    free_port,
    spawn,
    split_cpus,
    wait_for_workers,
    worker_argv,
    worker_env,
)
from research_rt.server_args import ServerArgs

logger = logging.getLogger("research_rt.dp")


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
    # Python installs its Ctrl-C handler only where SIGINT was not ignored at start-up; a shell's
    # background job starts with it ignored, and `kill -INT` then did nothing (the workers' Sanic
    # servers install their own). Stopping on SIGINT is this launcher's documented contract.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workers: list[Worker] = []
    router: subprocess.Popen | None = None
    status = 0
    try:
        for rank in range(n):
            port = free_port()
            threads = len(cpu_sets[rank])
            proc = spawn(
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
        router = spawn(router_argv(args, urls, free_port()), dict(os.environ), None, "[router] ")
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
