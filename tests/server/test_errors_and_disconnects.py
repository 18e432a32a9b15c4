"""Client mistakes get a 4xx JSON naming the problem (never a 500, never a hang); clients that go
away get their requests aborted and their KV slots back; 64 concurrent streams stay correct."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest
import requests


@pytest.fixture(scope="module")
def server(tiny_server_factory):
    return tiny_server_factory()


def msg(r) -> str:
    return r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"text": "x", "sampling_params": {"temperature": -1}}, "temperature must be non-negative, got -1."),
        ({"text": "x", "sampling_params": {"top_p": 0}}, "top_p must be in (0, 1], got 0."),
        ({"text": "x", "sampling_params": {"top_k": 0}}, "top_k must be -1 (disable) or at least 1, got 0."),
        ({"text": "x", "sampling_params": {"min_p": 2}}, "min_p must be in [0, 1], got 2."),
        (
            {"text": "x", "sampling_params": {"frequency_penalty": 3}},
            "frequency_penalty must be in [-2, 2], got 3.",
        ),
        (
            {"text": "x", "sampling_params": {"presence_penalty": -3}},
            "presence_penalty must be in [-2, 2], got -3.",
        ),
        (
            {"text": "x", "sampling_params": {"repetition_penalty": 3}},
            "repetition_penalty must be in [0, 2], got 3.",
        ),
        (
            {"text": "x", "sampling_params": {"max_new_tokens": -1}},
            "max_new_tokens must be at least 0, got -1.",
        ),
        (
            {"text": "x", "sampling_params": {"max_new_tokens": 2, "min_new_tokens": 3}},
            "min_new_tokens must be in [0, max_new_tokens(2)], got 3.",
        ),
        ({"text": "x", "sampling_params": {"bogus_param": 1}}, "Unknown sampling parameter(s): bogus_param."),
        ({"text": "x", "input_ids": [1]}, "text and input_ids cannot be provided at the same time."),
        ({}, "Either text, input_ids or input_embeds should be provided."),
        ({"input_ids": []}, "input_ids cannot be empty."),
        ({"input_ids": [1, 99999]}, "Token id 99999 in input_ids is outside the vocabulary (size 49152)."),
        (
            {"input_ids": list(range(8192))},
            "The input (8192 tokens) is longer than the model's context length (8192 tokens).",
        ),
        (
            {"input_ids": [5] * 8000, "sampling_params": {"max_new_tokens": 500}},
            "Requested token count exceeds the model's maximum context length of 8192 tokens. You requested a total "
            "of 8500 tokens: 8000 tokens from the input messages and 500 tokens for the completion. Please reduce "
            "the number of tokens in the input messages or the completion to fit within the limit.",
        ),
        (
            {"text": "x", "return_logprob": True, "logprob_start_len": 5},
            "logprob_start_len, (5) is higher than the number of input tokens (1). Request with a lower "
            "logprob_start_len.",
        ),
    ],
)
def test_generate_value_errors(server, body, expected):
    r = requests.post(server.base_url + "/generate", json=body, timeout=30)
    assert r.status_code == 400 and r.json() == {"error": {"message": expected}}


@pytest.mark.parametrize(
    "raw, field",
    [
        (b'{"text": "x"', "Malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "body is empty"),
        (b'{"text": 5}', "'text'"),
        (b'{"input_ids": "abc"}', "'input_ids'"),
        (b'{"input_ids": [1, "a"]}', "'input_ids'"),
        (b'{"text": "x", "sampling_params": "hot"}', "'sampling_params'"),
        (b'{"text": "x", "sampling_params": {"temperature": "hot"}}', "sampling_params.temperature"),
        (b'{"text": "x", "sampling_params": {"max_new_tokens": 1.5}}', "sampling_params.max_new_tokens"),
        (b'{"text": "x", "stream": "yes"}', "'stream'"),
        (b'{"text": "x", "return_logprob": 1}', "'return_logprob'"),
        (b'{"text": "x", "top_logprobs_num": -1}', "'top_logprobs_num'"),
        (b'{"text": "x", "rid": 7}', "'rid'"),
        (b'{"text": "x", "image_data": "a.png"}', "'image_data'"),
    ],
)
def test_generate_malformed_bodies(server, raw, field):
    r = requests.post(server.base_url + "/generate", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and field in msg(r)


def test_other_endpoints_bad_bodies(server):
    base = server.base_url
    assert requests.post(base + "/abort_request", data=b"{oops").status_code == 400
    r = requests.post(base + "/update_weights_from_disk", json={"load_format": "auto"})
    assert r.status_code == 400 and r.json()["success"] is False and "model_path" in r.json()["message"]
    r = requests.post(base + "/v1/completions", json={"model": "m"})
    assert r.status_code == 400 and r.json()["object"] == "error" and "'prompt'" in r.json()["message"]
    r = requests.post(base + "/v1/chat/completions", json={"model": "m", "messages": "hi"})
    assert r.status_code == 400 and "'messages'" in r.json()["message"]
    r = requests.post(
        base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": "2"}
    )
    assert r.status_code == 400 and "'n'" in r.json()["message"]
    r = requests.post(base + "/v1/completions", json={"prompt": "x", "temperature": -2})
    assert r.status_code == 400 and r.json()["message"] == "temperature must be non-negative, got -2."


def test_unknown_route_and_wrong_method(server):
    r = requests.get(server.base_url + "/no_such_route")
    assert r.status_code == 404 and "Not Found" in msg(r)
    for method, path in (
        ("get", "/generate"),
        ("delete", "/flush_cache"),
        ("get", "/update_weights_from_disk"),
        ("post", "/get_model_info"),
        ("get", "/v1/chat/completions"),
    ):
        r = getattr(requests, method)(server.base_url + path)
        assert r.status_code == 405, (method, path)
        assert "Method Not Allowed" in json.dumps(r.json())
    assert requests.get(server.base_url + "/metrics").status_code == 404  # no --enable-metrics


def _raw_request(server, body: dict) -> socket.socket:
    port = int(server.base_url.rsplit(":", 1)[1])
    data = json.dumps(body)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        f"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n{data}".encode()
    )
    return s


def _wait_running(server, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while requests.get(server.base_url + "/get_load").json()[0]["num_running_reqs"] < n:
        assert time.monotonic() < deadline
        time.sleep(0.02)


LONG = {"max_new_tokens": 7000, "ignore_eos": True}  # well over 3 s of decoding on the tiny model


def test_disconnect_mid_request_frees_pool(server):
    s = _raw_request(server, {"text": "a long answer please", "sampling_params": LONG})
    _wait_running(server, 1)
    s.close()
    t0 = time.monotonic()
    info = server.wait_idle_and_whole(timeout=3)  # far less than the ~10 s the request would run
    assert time.monotonic() - t0 < 3 and info["kv_pool_whole"] is True


def test_disconnect_mid_stream_frees_pool(server):
    s = _raw_request(server, {"text": "stream a long answer", "sampling_params": LONG, "stream": True})
    buf = b""
    while buf.count(b"data: ") < 3:
        buf += s.recv(65536)
    assert b"200 OK" in buf.split(b"\r\n")[0] and b"text/event-stream" in buf
    s.close()
    info = server.wait_idle_and_whole(timeout=3)
    assert info["kv_pool_whole"] is True and info["num_cached_tokens"] > 0  # aborted tokens stay cached


def test_64_concurrent_streams_with_disconnects(server):
    prompts = [f"Client number {i} says" for i in range(64)]
    sp = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}

    async def client(session, i):
        body = {
            "text": prompts[i],
            "sampling_params": sp if i % 4 else {**sp, "max_new_tokens": 1000},
            "stream": True,
        }
        async with session.post(server.base_url + "/generate", json=body) as r:
            assert r.status == 200
            events, done = [], False
            async for raw in r.content:
                line = raw.decode().strip()
                if not line:
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                events.append(json.loads(line[6:]))
                if i % 4 == 0 and len(events) == 3:
                    return None  # disconnect mid-stream (the session closes the connection)
            assert done
            return events

    async def main():
        conn = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
            return await asyncio.gather(*(client(session, i) for i in range(64)))

    results = asyncio.run(main())
    info = server.wait_idle_and_whole(timeout=10)
    assert info["kv_pool_whole"] is True
    checked = 0
    for i, events in enumerate(results):
        if i % 4 == 0:
            assert events is None
            continue
        texts = [e["text"] for e in events]
        assert all(b.startswith(a.rstrip("\ufffd")) for a, b in zip(texts, texts[1:]))
        final = events[-1]
        assert final["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
        assert len(final["output_ids"]) == 12
        if i % 8 == 1:  # the same prompt alone gives the same greedy tokens
            alone = requests.post(
                server.base_url + "/generate", json={"text": prompts[i], "sampling_params": sp}
            )
            assert alone.json()["output_ids"] == final["output_ids"]
            checked += 1
    assert checked == 8
