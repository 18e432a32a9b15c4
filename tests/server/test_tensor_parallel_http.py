"""A server at --tp-size 2 answers like tp 1, survives flush, weight updates and abort, reports
its tp_size, and leaves no rank process behind after SIGTERM."""

from __future__ import annotations

import psutil
import requests

from tests.conftest import eager_engine
from tests.server.server_harness import stop_server

PROMPT = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 16}}


def gen(server) -> list[int]:
    r = requests.post(server.base_url + "/generate", json=PROMPT, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def tp1_ids(path) -> list[int]:
    engine = eager_engine(str(path), dtype="float32", random_seed=0, max_total_tokens=40000)
    try:
        return engine.generate(PROMPT["text"], PROMPT["sampling_params"])["output_ids"]
    finally:
        engine.shutdown()


def test_tp2_server(tiny_server_factory, tiny_dir, tiny_dir_b):
    server = tiny_server_factory(["--tp-size", "2"])
    ranks = [p.pid for p in psutil.Process(server.process.pid).children(recursive=True)]
    assert ranks, "no rank process was spawned"
    info = requests.get(server.base_url + "/get_server_info").json()
    assert info["tp_size"] == 2
    base = gen(server)
    assert base == tp1_ids(tiny_dir)

    assert requests.post(server.base_url + "/flush_cache").status_code == 200
    assert gen(server) == base
    r = requests.post(server.base_url + "/update_weights_from_disk", json={"model_path": str(tiny_dir_b)})
    assert r.status_code == 200 and r.json()["success"], r.text
    other = gen(server)
    assert other != base and other == tp1_ids(tiny_dir_b)
    bad = requests.post(server.base_url + "/update_weights_from_disk", json={"model_path": "/nonexistent"})
    assert bad.json()["success"] is False
    assert gen(server) == other
    r = requests.post(server.base_url + "/update_weights_from_disk", json={"model_path": str(tiny_dir)})
    assert r.json()["success"]
    assert requests.post(server.base_url + "/abort_request", json={"abort_all": True}).status_code == 200
    assert gen(server) == base
    assert server.wait_idle_and_whole()["kv_pool_whole"] is True

    stop_server(server)  # SIGTERM
    psutil.wait_procs([psutil.Process(p) for p in ranks if psutil.pid_exists(p)], timeout=20)
    alive = [p for p in ranks if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not alive, f"rank processes left after shutdown: {alive}"
