"""Helpers for server tests: start a real server in a subprocess on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_idle_and_whole(self, timeout: float = 10.0) -> dict:
        """Poll /get_server_info until nothing runs or waits; return it (the caller checks the pool)."""
        deadline = time.monotonic() + timeout
        while True:
            info = requests.get(self.base_url + "/get_server_info", timeout=30).json()
            if info["num_running_reqs"] == 0 and info["num_queue_reqs"] == 0:
                return info
            assert time.monotonic() < deadline, (
                f"server still busy after {timeout}s: {info['num_running_reqs']}"
            )
            time.sleep(0.05)


def server_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_server(
    args: list[str],
    log_path: Path,
    timeout: float = 180.0,
    ready_path: str = "/health",
    cwd: Path | None = None,
) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "research_rt.launch_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    log = open(log_path, "w")  # noqa: SIM115 - kept open for the process's lifetime
    proc = subprocess.Popen(cmd, cwd=cwd or REPO_ROOT, env=server_env(), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if requests.get(base + ready_path, timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start in {timeout}s:\n{log_path.read_text()}")
        time.sleep(0.2)
    # the warm-up request runs after the port opens: wait for its log line too
    while "The server is fired up and ready to roll!" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server never finished its warm-up:\n{log_path.read_text()}")
        time.sleep(0.2)
    return Server(base, proc, log_path)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


# Eager: these servers test the HTTP layer, which compile does not change (a background compile per
# server would cost the suite minutes); the default configuration, compile on, is served by
# test_default_config.py (one server per architecture family) and test_notebook_flow.py.
EAGER = "--disable-torch-compile"
TINY_ARGS = ["--dtype", "float32", "--max-total-tokens", "40000", "--random-seed", "0", EAGER]


def long_tiny(path: Path, tokenizer_dir: Path, seed: int) -> Path:
    """The tiny Llama with 8192 positions (long generations make disconnect tests meaningful)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("tests_root_conftest", REPO_ROOT / "tests" / "conftest.py")
    root = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root)
    root.make_tiny_checkpoint(
        "LlamaForCausalLM", path, vocab_size=49152, seed=seed, tokenizer_dir=tokenizer_dir
    )
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 8192
    (path / "config.json").write_text(json.dumps(cfg))
    return path
