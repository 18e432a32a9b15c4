"""`python -m research_rt.launch_server [--model-path P] [--port 30000] ...`: SGLang's launcher.

Loads the model (the embedded SmolLM2-135M-Instruct when no --model-path), logs what SGLang logs,
then serves the Sanic app in a single process (the engine owns a scheduler thread and the model),
sends one warm-up request and logs `The server is fired up and ready to roll!`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import urllib.request

from research_rt.server_args import ServerArgs

logger = logging.getLogger("research_rt.launch_server")

LOG_FORMAT = "[%(asctime)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
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
    if args.tp_size != 1 or args.dp_size != 1:
        parser.error("--tp-size and --dp-size must be 1 (research_rt runs one device).")
    return args


def warmup(args: ServerArgs, host: str, is_embedding: bool = False) -> None:
    """Wait for the routes, send one small generation, and announce readiness (SGLang's flow)."""
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
    logger.info("The server is fired up and ready to roll!")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args)

    from sanic.server.socket import bind_socket

    from research_rt.engine.engine import Engine
    from research_rt.loader.resolve import ModelNotFoundError, resolve_model_path
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
    # SO_REUSEADDR: binds even while launch_server_cmd holds its (non-listening) reservation socket
    sock = bind_socket(args.host, args.port, backlog=1024)
    connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host

    @app.after_server_start
    async def _start_warmup(app) -> None:  # noqa: ANN001 - Sanic listener signature
        logger.info("Serving on http://%s:%d", args.host, args.port)
        threading.Thread(
            target=warmup, args=(args, connect_host, engine.is_embedding), daemon=True, name="warmup"
        ).start()

    try:
        app.run(sock=sock, single_process=True, access_log=args.log_requests, motd=False, auto_reload=False)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
