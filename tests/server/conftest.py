"""A real server in a subprocess on a free port (real HTTP), started once per test module."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_harness import TINY_ARGS, Server, long_tiny, start_server, stop_server


@pytest.fixture(scope="module")
def tiny_server_factory(tmp_path_factory, tiny_dir):
    """start(extra_args) -> Server on the tiny Llama; every server is stopped at module end."""
    servers: list[Server] = []

    def start(extra: list[str] = (), model: Path | None = None) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        s = start_server(["--model-path", str(model or tiny_dir), *TINY_ARGS, *extra], log)
        servers.append(s)
        return s

    yield start
    for s in servers:
        stop_server(s)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    return long_tiny(tmp_path_factory.mktemp("tiny_a"), smollm_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_dir_b(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    """Same architecture and shapes as `tiny_dir`, different random weights."""
    return long_tiny(tmp_path_factory.mktemp("tiny_b"), smollm_tokenizer_dir, seed=1)
