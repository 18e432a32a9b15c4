"""Native endpoints on the tiny model: /generate in all its shapes, info, health, cache, abort, logs."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

GREEDY = {"temperature": 0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny_server_factory):
    return tiny_server_factory(["--enable-metrics"])


def post(server, path, body=None, **kw):
    return requests.post(server.base_url + path, json=body, timeout=60, **kw)


def read_sse(resp) -> list:
    """Parse an SSE response as a client does: `data:` lines until exactly `data: [DONE]`."""
    events, done = [], False
    for line in resp.iter_lines(decode_unicode=True):
        if not line:
            continue
        assert line.startswith("data: "), line
        if line == "data: [DONE]":
            done = True
            break
        events.append(json.loads(line[len("data: ") :]))
    assert done, "stream ended without data: [DONE]"
    return events


def test_launch_logs(server):
    log = server.log()
    assert "server_args=ServerArgs(model_path=" in log
    assert "max_total_num_tokens=40000, chunked_prefill_size=" in log and "context_len=8192" in log
    assert "The server is fired up and ready to roll!" in log
    assert "Prefill batch. #new-seq: 1, #new-token: " in log
    assert ' - "POST ' not in log and ' - "GET ' not in log  # no access log without --log-requests


def test_generate_single(server):
    r = post(server, "/generate", {"text": "The capital of France is", "sampling_params": GREEDY})
    assert r.status_code == 200
    out = r.json()
    assert isinstance(out["text"], str) and len(out["output_ids"]) == 8
    meta = out["meta_info"]
    assert list(meta) == [
        "id",
        "finish_reason",
        "prompt_tokens",
        "weight_version",
        "completion_tokens",
        "cached_tokens",
        "e2e_latency",
    ]
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["completion_tokens"] == 8 and meta["prompt_tokens"] == 5
    # greedy is deterministic; PUT is accepted too; a repeat hits the radix cache
    again = requests.put(
        server.base_url + "/generate", json={"text": "The capital of France is", "sampling_params": GREEDY}
    )
    assert again.status_code == 200 and again.json()["output_ids"] == out["output_ids"]
    assert again.json()["meta_info"]["cached_tokens"] == 4


def test_generate_input_ids_and_rid(server):
    r = post(server, "/generate", {"input_ids": [10, 11, 12], "rid": "my-rid", "sampling_params": GREEDY})
    assert r.status_code == 200
    assert r.json()["meta_info"]["id"] == "my-rid" and r.json()["meta_info"]["prompt_tokens"] == 3


def test_generate_batch_and_n(server):
    r = post(server, "/generate", {"text": ["a b c", "d e"], "sampling_params": GREEDY})
    assert r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) == 2
    single = post(server, "/generate", {"text": "d e", "sampling_params": GREEDY}).json()
    assert r.json()[1]["output_ids"] == single["output_ids"]
    r = post(server, "/generate", {"text": ["x", "y"], "sampling_params": {"n": 3, "max_new_tokens": 4}})
    outs = r.json()
    assert len(outs) == 6 and len({o["meta_info"]["id"] for o in outs}) == 6
    assert all(o["meta_info"]["completion_tokens"] == 4 for o in outs)
    r = post(server, "/generate", {"text": "x", "sampling_params": {"n": 2, "max_new_tokens": 2}})
    assert isinstance(r.json(), list) and len(r.json()) == 2


def test_generate_max_new_tokens_zero(server):
    r = post(
        server,
        "/generate",
        {
            "text": "hello world",
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
        },
    )
    meta = r.json()["meta_info"]
    assert r.status_code == 200 and meta["completion_tokens"] == 0 and r.json()["output_ids"] == []
    assert len(meta["input_token_logprobs"]) == 2 and meta["input_token_logprobs"][0][0] is None


def test_generate_logprobs(server):
    body = {
        "text": "one two three four five",
        "sampling_params": GREEDY,
        "return_logprob": True,
        "logprob_start_len": 1,
        "top_logprobs_num": 3,
        "return_text_in_logprobs": True,
        "token_ids_logprob": [5, 6],
    }
    meta = post(server, "/generate", body).json()["meta_info"]
    n = meta["prompt_tokens"]
    assert len(meta["input_token_logprobs"]) == n - 1 and meta["input_token_logprobs"][0][0] is None
    assert len(meta["output_token_logprobs"]) == 8
    assert all(isinstance(e[2], str) for e in meta["output_token_logprobs"])
    assert all(len(t) == 3 for t in meta["output_top_logprobs"])
    assert all(t[0][1] == e[1] for t, e in zip(meta["output_top_logprobs"], meta["output_token_logprobs"]))
    assert [[x[1] for x in t] for t in meta["output_token_ids_logprobs"]] == [[5, 6]] * 8


def test_generate_stream(server):
    body = {"text": "Once upon a time", "sampling_params": GREEDY, "stream": True}
    with post(server, "/generate", body, stream=True) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_sse(r)
    assert len(events) == 8
    texts = [e["text"] for e in events]
    assert all(b.startswith(a.rstrip("\ufffd")) for a, b in zip(texts, texts[1:]))  # cumulative
    assert [e["meta_info"]["completion_tokens"] for e in events] == list(range(1, 9))
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1]) and "index" not in events[0]
    final = post(server, "/generate", {"text": "Once upon a time", "sampling_params": GREEDY}).json()
    assert events[-1]["text"] == final["text"] and events[-1]["output_ids"] == final["output_ids"]


def test_generate_stream_batch_has_index(server):
    body = {"text": ["a", "b"], "sampling_params": {"n": 2, "max_new_tokens": 3}, "stream": True}
    with post(server, "/generate", body, stream=True) as r:
        events = read_sse(r)
    assert sorted({e["index"] for e in events}) == [0, 1, 2, 3]
    finals = [e for e in events if e["meta_info"]["finish_reason"]]
    assert len(finals) == 4


def test_stream_error_before_start_is_json_400(server):
    r = post(server, "/generate", {"text": "x", "sampling_params": {"top_p": 5}, "stream": True})
    assert r.status_code == 400 and r.json() == {"error": {"message": "top_p must be in (0, 1], got 5."}}


def test_model_and_server_info(server, tiny_dir):
    info = requests.get(server.base_url + "/get_model_info").json()
    assert info == {"model_path": str(tiny_dir), "tokenizer_path": str(tiny_dir), "is_generation": True}
    s = requests.get(server.base_url + "/get_server_info").json()
    for key in (
        "model_path",
        "chunked_prefill_size",
        "schedule_policy",
        "disable_radix_cache",
        "random_seed",
        "stream_interval",
        "skip_tokenizer_init",
        "served_model_name",
    ):
        assert key in s
    assert s["max_total_num_tokens"] == 40000 and isinstance(s["max_req_input_len"], int)
    assert isinstance(s["version"], str) and isinstance(s["attention_backend"], str)
    assert isinstance(s["last_gen_throughput"], float)
    assert s["num_free_tokens"] + s["num_used_tokens"] + s["num_cached_tokens"] == 40000
    assert 0 <= s["cache_hit_rate"] <= 1 and s["kv_pool_whole"] is True


def test_health(server):
    assert requests.get(server.base_url + "/health").status_code == 200
    r = requests.get(server.base_url + "/health_generate")
    assert r.status_code == 200 and r.text == ""
    assert requests.get(server.base_url + "/get_load").json()[0]["num_running_reqs"] == 0


def test_flush_cache(server):
    post(server, "/generate", {"text": "cache me please", "sampling_params": GREEDY})
    for method in ("get", "post"):
        r = getattr(requests, method)(server.base_url + "/flush_cache")
        assert r.status_code == 200 and r.text.startswith("Cache flushed.\nPlease check backend logs")
    assert requests.get(server.base_url + "/get_server_info").json()["num_cached_tokens"] == 0
    # refused (400, same text) while a request runs
    body = {"text": "long", "sampling_params": {"max_new_tokens": 7000, "ignore_eos": True}, "stream": True}
    with post(server, "/generate", body, stream=True) as stream:
        lines = stream.iter_lines()
        next(lines)
        deadline = time.monotonic() + 5
        while requests.get(server.base_url + "/get_load").json()[0]["num_running_reqs"] == 0:
            assert time.monotonic() < deadline, "the long request is not running"
            time.sleep(0.05)
        r = requests.post(server.base_url + "/flush_cache")
        if r.status_code != 400:  # say how the long request ended, to tell a race from an early finish
            rest = [x for x in lines if x]
            raise AssertionError(f"flush was not refused ({r.status_code}); stream tail: {rest[-2:]}")
        assert r.text.startswith("Cache flushed.")
    server.wait_idle_and_whole()


def test_abort_request(server):
    result = {}

    def run():
        body = {
            "text": "abort me",
            "rid": "to-abort",
            "sampling_params": {"max_new_tokens": 7000, "ignore_eos": True},
        }
        result["r"] = post(server, "/generate", body)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while requests.get(server.base_url + "/get_load").json()[0]["num_running_reqs"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert post(server, "/abort_request", {"rid": "to-abort"}).status_code == 200
    t.join(10)
    out = result["r"].json()
    assert result["r"].status_code == 200 and out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["completion_tokens"] < 7000
    assert post(server, "/abort_request", {"abort_all": True}).status_code == 200
    assert post(server, "/abort_request", {}).status_code == 400
    assert server.wait_idle_and_whole()["kv_pool_whole"] is True


def test_embedding_and_moe_endpoints_refuse(server):
    msg = (
        "This model does not appear to be an embedding model by default. Please add `--is-embedding` when "
        "launching the server or try another model."
    )
    for path in ("/encode", "/classify"):
        r = post(server, path, {"model": "x", "text": "Once upon a time"})
        assert r.status_code == 400 and r.json() == {"error": {"message": msg}}
    r = post(server, "/encode", {})
    assert r.status_code == 400 and "At least one of text, input_ids" in r.json()["error"]["message"]
    r = post(server, "/encode", {"text": "a", "input_ids": [1]})
    assert r.json()["error"]["message"] == "text and input_ids cannot be provided at the same time"
    r = post(server, "/v1/embeddings", {"model": "x", "input": "hi"})
    assert r.status_code == 400 and r.json()["message"] == msg
    for what in ("start", "stop", "dump"):
        r = post(server, f"/{what}_expert_distribution_record")
        assert r.status_code == 400 and "not a MoE model" in r.json()["error"]["message"]


def test_profile(server, tmp_path):
    r = post(server, "/start_profile", {"output_dir": str(tmp_path)})
    assert r.status_code == 200 and r.text == "Start profiling.\n"
    assert post(server, "/start_profile").status_code == 400  # already running
    post(server, "/generate", {"text": "profile me", "sampling_params": {"max_new_tokens": 2}})
    r = requests.get(server.base_url + "/stop_profile")
    assert r.status_code == 200 and r.text == "Stop profiling. This will take some time.\n"
    traces = list(tmp_path.glob("*.trace.json"))
    assert len(traces) == 1 and "aten::" in traces[0].read_text()
    assert requests.post(server.base_url + "/stop_profile").status_code == 400


def test_metrics(server):
    post(server, "/generate", {"text": "count me", "sampling_params": GREEDY})
    r = requests.get(server.base_url + "/metrics")
    assert r.status_code == 200
    for name in (
        "num_running_reqs",
        "num_used_tokens",
        "token_usage",
        "gen_throughput",
        "num_queue_reqs",
        "cache_hit_rate",
        "prompt_tokens_total",
        "generation_tokens_total",
        "num_requests_total",
    ):
        assert f"sglang:{name}{{model_name=" in r.text
    for suffix in ("_sum{", "_count{", "_bucket{"):
        assert "sglang:time_to_first_token_seconds" + suffix in r.text
        assert "sglang:e2e_request_latency_seconds" + suffix in r.text
    total = next(line for line in r.text.splitlines() if line.startswith("sglang:num_requests_total{"))
    assert float(total.split()[-1]) >= 1
