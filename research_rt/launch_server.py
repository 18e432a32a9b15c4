"""`python -m research_rt.launch_server [--model-path P] [--port 30000] ...`: SGLang's launcher.

Loads the model (the embedded SmolLM2-135M-Instruct when no --model-path), logs what SGLang logs,
then serves the Sanic app in a single process (the engine owns a scheduler thread and the model),
sends one warm-up request and logs `The server is fired up and ready to roll!`. `/health` answers
503 until then, and again from the first SIGINT / SIGTERM on, while running requests finish (up to
10 s; then they are aborted and the server stops).

With `--dp-size N` (N > 1) it starts N such servers on free loopback ports instead, with sglang-router
in front on --host/--port (see research_rt/data_parallel/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable

from research_rt.server_args import ServerArgs

logger = logging.getLogger("research_rt.launch_server")

LOG_FORMAT = "[%(asctime)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
SHUTDOWN_DRAIN_S = 10.0  # how long SIGTERM waits for running requests before aborting them
ACCESS_FORMAT = '[%(asctime)s] %(host)s - "%(request)s" %(status)s'


def configure_logging(args: ServerArgs) -> None:
    """SGLang's `[YYYY-mm-dd HH:MM:SS] message` lines; HTTP access lines only with --log-requests."""
    level = args.log_level.upper()
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=DATE_FORMAT, stream=sys.stdout, force=True)
    access = logging.getLogger("sanic.access")
    access.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(ACCESS_FORMAT, DATE_FORMAT))
    access.handlers = [handler]
    access.setLevel(logging.INFO if args.log_requests else logging.WARNING)
    http_level = (args.log_level_http or "warning").upper()
    for name in ("sanic.root", "sanic.server", "sanic.error"):
        logging.getLogger(name).setLevel(http_level)
    logging.getLogger("sanic.error").setLevel(min(logging.getLevelName(http_level), logging.ERROR))


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = argparse.ArgumentParser(
        prog="python -m research_rt.launch_server", description="Serve a model over SGLang's native HTTP API."
    )
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(argv)
    try:
        args = ServerArgs.from_cli_args(ns)
    except ValueError as e:
        parser.error(str(e))
    if args.tp_size < 1:
        parser.error("--tp-size must be at least 1.")
    if args.dp_size < 1:
        parser.error("--dp-size must be at least 1.")
    return args


def warmup(
    args: ServerArgs, host: str, is_embedding: bool = False, on_ready: Callable[[], None] | None = None
) -> None:
    """Wait for the routes, send one small generation, and announce readiness (SGLang's flow);
    `on_ready()` is called just before the announcement (it turns /health from 503 to 200)."""
    base = f"http://{host}:{args.port}"
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(
                urllib.request.Request(base + "/get_model_info", headers=headers), timeout=5
            )
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                logger.error("Warm-up failed: the server did not answer /get_model_info.")
                return
            time.sleep(0.5)
    payload: dict = {} if is_embedding else {"sampling_params": {"temperature": 0, "max_new_tokens": 8}}
    if args.skip_tokenizer_init:
        payload["input_ids"] = [10, 11, 12]
    else:
        payload["text"] = "The capital city of France is"
    try:
        route = "/encode" if is_embedding else "/generate"
        req = urllib.request.Request(base + route, data=json.dumps(payload).encode(), headers=headers)
        urllib.request.urlopen(req, timeout=600).read()
    except Exception as e:  # noqa: BLE001
        logger.error("Warm-up request failed: %s", e)
        return
    if on_ready is not None:
        on_ready()
    logger.info("The server is fired up and ready to roll!")


async def drain(engine) -> None:  # noqa: ANN001 - the Engine
    """Wait (up to SHUTDOWN_DRAIN_S) until nothing is queued or running, then abort what is left."""

    async def idle() -> bool:  # asked on the scheduler thread, between two steps
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, engine.is_idle, 5)
        except TimeoutError:
            return False

    deadline = time.monotonic() + SHUTDOWN_DRAIN_S
    while not await idle():
        if time.monotonic() > deadline:
            logger.info("Aborting the requests still running after %.0f s.", SHUTDOWN_DRAIN_S)
            engine.abort_request(None)
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the last responses go out before Sanic closes the connections


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args)
    if args.dp_size > 1:  # N servers of dp_size 1 behind sglang-router
        from research_rt.data_parallel.launcher import run_data_parallel

        sys.exit(run_data_parallel(args))

    from sanic.server.socket import bind_socket

    from research_rt.engine.engine import Engine
    from research_rt.loader.resolve import ModelNotFoundError, resolve_model_path
    from research_rt.server import info
    from research_rt.server.app import create_app
    from research_rt.server.state import ServerState

    try:
        path = resolve_model_path(args.model_path).path
    except ModelNotFoundError as e:
        logger.error("Cannot load the model: %s", e)
        sys.exit(1)
    args = args.replace(
        model_path=path,
        tokenizer_path=args.tokenizer_path or path,
        served_model_name=args.served_model_name or path,
    ).resolved()
    logger.info("server_args=%s", args)
    engine = Engine(server_args=args)
    logger.info(
        "max_total_num_tokens=%d, chunked_prefill_size=%d, max_prefill_tokens=%d, max_running_requests=%d, "
        "context_len=%d",
        engine.max_total_num_tokens,
        args.chunked_prefill_size,
        args.max_prefill_tokens,
        engine.max_running_requests,
        engine.context_len,
    )
    app = create_app(ServerState.create(engine, args), name="research_rt")
    info.set_ready(app, False)  # /health: 503 until the warm-up request has run
    # SO_REUSEADDR: binds even while launch_server_cmd holds its (non-listening) reservation socket
    sock = bind_socket(args.host, args.port, backlog=1024)
    connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host

    @app.after_server_start
    async def _start_warmup(app) -> None:  # noqa: ANN001 - Sanic listener signature
        logger.info("Serving on http://%s:%d", args.host, args.port)
        threading.Thread(
            target=warmup,
            args=(args, connect_host, engine.is_embedding, lambda: info.set_ready(app, True)),
            daemon=True,
            name="warmup",
        ).start()

    @app.before_server_stop
    async def _drain(app) -> None:  # noqa: ANN001 - Sanic listener signature
        # SIGINT / SIGTERM: Sanic still listens while this runs, so a router polling /health sees
        # 503 and stops sending here, while the requests already running finish
        info.set_ready(app, False)
        logger.info("Shutting down: /health answers 503; waiting for running requests.")
        await drain(engine)
        # close the (now idle) client connections while the loop still runs: Sanic's own wait for
        # open connections after a stop fails under uvloop ("Event loop stopped before Future
        # completed") and would turn a clean shutdown into exit status 1
        for transport in list(transports):
            if not transport.is_closing():
                transport.close()
        await asyncio.sleep(0.1)

    transports: set = set()

    @app.on_request
    async def _track_connection(request) -> None:  # noqa: ANN001 - Sanic middleware signature
        if request.transport is not None and request.transport not in transports:
            if len(transports) >= 256:  # forget the closed ones
                transports.difference_update([t for t in transports if t.is_closing()])
            transports.add(request.transport)

    try:
        app.run(
            sock=sock,
            single_process=True,
            access_log=args.log_requests,
            motd=False,
            auto_reload=False,
        )
    finally:
        engine.shutdown(wait_for_compile=False)
        if not engine.wait_for_compile(timeout=0):
            # a background compile still running in C++ would abort the interpreter's exit
            # ("terminate called without an active exception", status 134): leave at once
            logger.info("Exiting while the decode step was still compiling.")
            logging.shutdown()
            os._exit(0)


if __name__ == "__main__":
    main()
