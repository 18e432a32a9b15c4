"""A bounded mixed load on loopback (the small version of benchmarks/bench_load.py): 160 requests,
native and chat, streaming and not, n=1 and n=2, 16 at a time, about 12% hanging up mid-stream.
No 5xx, every finished answer well formed, the KV pool whole afterwards, the server still correct."""

from __future__ import annotations

import asyncio
import sys

import requests
from server_harness import REPO_ROOT

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_load import make_specs, run_load  # noqa: E402

NUM, CONCURRENCY, DISCONNECT = 160, 16, 0.12


def test_mix_is_what_it_claims():
    specs = make_specs(NUM, DISCONNECT, 16, seed=0)
    assert {(s.chat, s.stream, s.n) for s in specs} == {
        (c, st, n) for c in (False, True) for st in (False, True) for n in (1, 2)
    }
    hangups = sum(s.disconnect_after is not None for s in specs)
    assert all(s.stream for s in specs if s.disconnect_after is not None)
    assert 0.06 * NUM < hangups < 0.2 * NUM


def test_load_with_disconnects(tiny_server_factory):
    server = tiny_server_factory()
    normal = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
    before = requests.post(server.base_url + "/generate", json=normal, timeout=30).json()["output_ids"]

    # each hang-up asks for 2000 tokens: not aborted, they would keep the server busy for a long time
    result = asyncio.run(
        run_load(
            server.base_url, NUM, CONCURRENCY, DISCONNECT, max_new_tokens=16, timeout=120, hangup_tokens=2000
        )
    )
    summary = result.summary()
    assert result.malformed == [], result.malformed[:5]
    assert summary["server_errors_5xx"] == 0 and set(result.statuses) == {200}, summary
    assert result.disconnected > 0 and result.finished + result.disconnected == NUM, summary
    assert result.pool_whole is True and result.idle_after < 5, summary
    print(summary)

    after = requests.post(server.base_url + "/generate", json=normal, timeout=30).json()["output_ids"]
    assert after == before
    log = server.log()
    assert "Traceback" not in log and "Internal error" not in log, log[-4000:]
