"""Notebook helpers with `sglang.utils`' signatures, so SGLang notebooks run after changing only
the import and the launch command:

    server_process, port = launch_server_cmd("python -m research_rt.launch_server --host 0.0.0.0")
    wait_for_server(f"http://localhost:{port}")
    ...
    terminate_process(server_process)

With data parallelism (`--dp-size N`: N servers behind sglang-router) the router does not forward
`/abort_request` or `/update_weights_from_disk`; `abort_request_all` and `update_weights_from_disk_all`
send them to every worker, found through the router's `GET /workers` (or given as a list).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

# Popen -> the socket that reserves its port (released by terminate_process)
process_socket_map: dict[subprocess.Popen, socket.socket] = {}


def reserve_port(host: str, start: int = 30000, end: int = 40000) -> tuple[int, socket.socket]:
    """Bind (SO_REUSEADDR, not listening) a random free port in [start, end) and keep the socket."""
    candidates = list(range(start, end))
    random.shuffle(candidates)
    for port in candidates:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            continue
        if _port_in_use(port):  # another server listens on a different address with this port
            sock.close()
            continue
        return port, sock
    raise RuntimeError(f"No free port in [{start}, {end}).")


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def execute_shell_command(command: str) -> subprocess.Popen:
    """Run `command` (whitespace-split, no shell; backslash-newlines allowed), stderr -> stdout."""
    command = command.replace("\\\n", " ").replace("\\", " ")
    return subprocess.Popen(command.split(), text=True, stderr=subprocess.STDOUT)


def launch_server_cmd(
    command: str, host: str = "0.0.0.0", port: int | None = None
) -> tuple[subprocess.Popen, int]:
    """Start `command --port N` in the background; returns (process, N). The port stays reserved
    by a held socket until `terminate_process`."""
    lock_socket = None
    if port is None:
        port, lock_socket = reserve_port(host)
    process = execute_shell_command(f"{command} --port {port}")
    if lock_socket is not None:
        process_socket_map[process] = lock_socket
    return process, port


def wait_for_server(base_url: str, timeout: int | None = None) -> None:
    """Poll `GET {base_url}/v1/models` (with `Authorization: Bearer None`) until it answers 200."""
    start = time.perf_counter()
    while True:
        try:
            req = urllib.request.Request(f"{base_url}/v1/models", headers={"Authorization": "Bearer None"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                if resp.status == 200:
                    time.sleep(5)
                    print_highlight(
                        "\n    NOTE: Typically, the server runs in a separate terminal.\n"
                        "    In this notebook, we run the server and notebook code together, so their outputs "
                        "are combined.\n    To improve clarity, the server logs are displayed in the original "
                        "black color, while the notebook outputs are highlighted in blue.\n"
                        "    We are running those notebooks in a CI parallel environment, so the throughput is "
                        "not representative of the actual performance.\n    "
                    )
                    return
        except urllib.error.HTTPError:
            pass
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(1)
        if timeout is not None and time.perf_counter() - start > timeout:
            raise TimeoutError("Server did not become ready within timeout period")


def terminate_process(process: subprocess.Popen) -> None:
    """Kill the process and its children, then release its reserved port."""
    import psutil

    try:
        parent = psutil.Process(process.pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    lock_socket = process_socket_map.pop(process, None)
    if lock_socket is not None:
        lock_socket.close()


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]

        shell = get_ipython()
    except ImportError:
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def print_highlight(html_content: Any) -> None:
    """Print in bold blue (as HTML in a notebook kernel)."""
    if _in_notebook() or os.environ.get("SGLANG_IS_IN_CI") == "true":
        try:
            from IPython.display import HTML, display  # type: ignore[import-not-found]

            html = str(html_content).replace("\n", "<br>")
            display(HTML(f"<strong style='color: #00008B;'>{html}</strong>"))
            return
        except ImportError:
            pass
    print(f"\033[1;34m{html_content}\033[0m", flush=True)


# ---------------------------------------------------------------- data parallel: every worker at once
def list_workers(router_url: str, api_key: str | None = None) -> list[str]:
    """The worker URLs sglang-router routes to (`GET {router_url}/workers`), in its order."""
    req = urllib.request.Request(f"{router_url.rstrip('/')}/workers", headers=_auth(api_key))
    with urllib.request.urlopen(req, timeout=10) as resp:
        return [w["url"] for w in json.loads(resp.read())["workers"]]


def broadcast(
    path: str,
    payload: dict[str, Any] | None,
    router_url: str | None = None,
    worker_urls: list[str] | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> list[tuple[str, int, str]]:
    """POST `payload` (JSON) to `path` on every worker, concurrently; `[(url, status, body text)]` in
    worker order (status 0 and the error text when a worker could not be reached). The workers are
    `worker_urls`, or those registered with the router at `router_url`."""
    from concurrent.futures import ThreadPoolExecutor

    if worker_urls is None:
        if router_url is None:
            raise ValueError("Give router_url or worker_urls.")
        worker_urls = list_workers(router_url, api_key)
    data = json.dumps(payload if payload is not None else {}).encode()
    headers = {"Content-Type": "application/json", **_auth(api_key)}

    def send(url: str) -> tuple[str, int, str]:
        req = urllib.request.Request(f"{url.rstrip('/')}{path}", data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return url, resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return url, e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            return url, 0, str(e)

    with ThreadPoolExecutor(max_workers=max(1, len(worker_urls))) as pool:
        return list(pool.map(send, worker_urls))


def abort_request_all(
    router_url: str | None = None,
    rid: str | None = None,
    worker_urls: list[str] | None = None,
    api_key: str | None = None,
) -> list[tuple[str, int, str]]:
    """Abort request `rid` (or, with no rid, every request) on every worker; only the worker that
    holds `rid` has anything to abort, the others answer 200 all the same."""
    payload = {"rid": rid} if rid else {"abort_all": True}
    return broadcast("/abort_request", payload, router_url, worker_urls, api_key)


def update_weights_from_disk_all(
    model_path: str,
    router_url: str | None = None,
    load_format: str | None = None,
    worker_urls: list[str] | None = None,
    api_key: str | None = None,
) -> list[dict[str, Any]]:
    """`POST /update_weights_from_disk` on every worker at once; each worker's JSON answer
    (`success`, `message`) with its `url` added. All workers succeed or the caller sees which failed."""
    payload: dict[str, Any] = {"model_path": model_path}
    if load_format is not None:
        payload["load_format"] = load_format
    results = []
    for url, status, body in broadcast(
        "/update_weights_from_disk", payload, router_url, worker_urls, api_key
    ):
        try:
            answer = json.loads(body)
        except ValueError:
            answer = {"success": False, "message": body or f"HTTP {status}"}
        results.append({"url": url, **answer})
    return results


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
