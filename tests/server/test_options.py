"""Launcher options: --api-key, --skip-tokenizer-init with --stream-output, bad flags, and the
port reservation of `research_rt.utils.launch_server_cmd` (a held SO_REUSEADDR socket)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests
from server_harness import REPO_ROOT, TINY_ARGS, server_env

from research_rt import utils


def test_api_key(tiny_server_factory):
    server = tiny_server_factory(["--api-key", "sk-123", "--log-requests"])
    base = server.base_url
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
    for headers in (
        {},
        {"Authorization": "Bearer None"},
        {"Authorization": "Bearer sk-12"},
        {"Authorization": "sk-123"},
    ):
        r = requests.post(base + "/generate", json=body, headers=headers)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        assert requests.get(base + "/v1/models", headers=headers).status_code == 401
        assert requests.get(base + "/get_server_info", headers=headers).status_code == 401
    ok = {"Authorization": "Bearer sk-123"}
    assert requests.post(base + "/generate", json=body, headers=ok).status_code == 200
    assert requests.get(base + "/v1/models", headers=ok).status_code == 200
    assert requests.get(base + "/health").status_code == 200
    assert requests.get(base + "/health_generate").status_code == 200
    deadline = time.monotonic() + 5  # access lines are written just after the response
    while '/health_generate" 200' not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log()
    assert "The server is fired up and ready to roll!" in log  # the warm-up sent the key
    assert '/v1/models" 401' in log and '/health_generate" 200' in log  # --log-requests access lines


def test_skip_tokenizer_init_via_launch_server_cmd(tiny_dir, monkeypatch):
    """launch_server_cmd holds the port with a bound SO_REUSEADDR socket; the server must still bind."""
    for k, v in server_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO_ROOT)
    cmd = (
        f"{sys.executable} -m research_rt.launch_server --model-path {tiny_dir} {' '.join(TINY_ARGS)} "
        "--skip-tokenizer-init --stream-output --host 127.0.0.1"
    )
    proc, port = utils.launch_server_cmd(cmd, host="127.0.0.1")
    try:
        assert proc in utils.process_socket_map  # reservation still held while the server binds
        base = f"http://127.0.0.1:{port}"
        t0 = time.time()
        utils.wait_for_server(base, timeout=120)
        assert time.time() - t0 < 120
        sp = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
        r = requests.post(
            base + "/generate",
            json={
                "input_ids": [10, 20, 30],
                "sampling_params": sp,
                "return_logprob": True,
                "logprob_start_len": 0,
            },
        )
        out = r.json()
        assert r.status_code == 200 and "text" not in out
        assert len(out["output_ids"]) == 12 and out["token_ids"] == out["output_ids"]
        assert len(out["meta_info"]["input_token_logprobs"]) == 3
        # --stream-output: streamed ids are incremental; their concatenation is the full output
        with requests.post(
            base + "/generate",
            json={"input_ids": [10, 20, 30], "sampling_params": sp, "stream": True},
            stream=True,
        ) as s:
            events = [
                json.loads(line[6:])
                for line in s.iter_lines(decode_unicode=True)
                if line and line != "data: [DONE]"
            ]
        assert all(len(e["output_ids"]) == 1 for e in events)
        assert sum((e["output_ids"] for e in events), []) == out["output_ids"]
        r = requests.post(base + "/generate", json={"text": "hello"})
        assert r.status_code == 400 and r.json()["error"]["message"] == (
            "The engine initialized with skip_tokenizer_init=True cannot accept text prompts. Please provide "
            "input_ids or re-initialize the engine with skip_tokenizer_init=False."
        )
        r = requests.post(
            base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 400 and "tokenizer" in r.json()["message"]
        assert requests.get(base + "/health_generate").status_code == 200
    finally:
        utils.terminate_process(proc)
    assert proc.poll() is not None and proc not in utils.process_socket_map


@pytest.mark.parametrize(
    "flags", [["--no-such-flag"], ["--schedule-policy", "nope"], ["--port", "abc"], ["--dtype", "int3"]]
)
def test_bad_flags_exit_nonzero(flags):
    r = subprocess.run(
        [sys.executable, "-m", "research_rt.launch_server", *flags],
        cwd=REPO_ROOT,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "error:" in r.stderr


def test_missing_model_exits_nonzero():
    r = subprocess.run(
        [sys.executable, "-m", "research_rt.launch_server", "--model-path", "no-org/no-model-x"],
        cwd=REPO_ROOT,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "no-org/no-model-x (repository not found)" in r.stdout + r.stderr
