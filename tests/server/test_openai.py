"""OpenAI-compatible endpoints on the tiny model (its SmolLM2 tokenizer has a chat template)."""

from __future__ import annotations

import json

import pytest
import requests


@pytest.fixture(scope="module")
def server(tiny_server_factory):
    return tiny_server_factory(["--served-model-name", "tiny-model", "--enable-cache-report"])


def sse_json(r) -> list:
    out = []
    for line in r.iter_lines(decode_unicode=True):
        if line:
            if line == "data: [DONE]":
                return out
            out.append(json.loads(line[6:]))
    raise AssertionError("no [DONE]")


def test_models_with_bearer_none(server):
    r = requests.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer None"})
    assert r.status_code == 200
    data = r.json()["data"]
    assert len(data) == 1 and data[0]["id"] == "tiny-model" and data[0]["max_model_len"] == 8192
    assert data[0]["object"] == "model" and data[0]["owned_by"] == "sglang"


def test_completions(server):
    body = {
        "model": "tiny-model",
        "prompt": ["Hello there", "The sky is"],
        "max_tokens": 5,
        "n": 2,
        "temperature": 0,
    }
    r = requests.post(server.base_url + "/v1/completions", json=body)
    out = r.json()
    assert r.status_code == 200 and out["object"] == "text_completion" and out["model"] == "tiny-model"
    assert len(out["choices"]) == 4 and [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in out["choices"])
    native = requests.post(
        server.base_url + "/generate",
        json={"text": "The sky is", "sampling_params": {"temperature": 0, "max_new_tokens": 5}},
    ).json()
    assert out["choices"][2]["text"] == native["text"]
    u = out["usage"]
    assert u["prompt_tokens"] == 2 + 3 and u["completion_tokens"] == 20 and u["total_tokens"] == 25  # not x n
    assert "cached_tokens" in u["prompt_tokens_details"]


def test_completions_echo_logprobs_stop(server):
    body = {"prompt": "one two three", "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2}
    c = requests.post(server.base_url + "/v1/completions", json=body).json()["choices"][0]
    assert c["text"].startswith("one two three")
    lp = c["logprobs"]
    assert len(lp["tokens"]) == 3 + 4 and lp["token_logprobs"][0] is None
    assert all(len(t) >= 1 for t in lp["top_logprobs"][1:]) and lp["top_logprobs"][0] is None
    plain = requests.post(
        server.base_url + "/v1/completions",
        json={"prompt": "one two three", "max_tokens": 4, "temperature": 0},
    ).json()
    word = plain["choices"][0]["text"][2:5]
    stopped = requests.post(
        server.base_url + "/v1/completions",
        json={"prompt": "one two three", "max_tokens": 4, "temperature": 0, "stop": [word]},
    ).json()
    ch = stopped["choices"][0]
    assert ch["finish_reason"] == "stop" and ch["matched_stop"] == word and word not in ch["text"]


def test_completions_stream_usage(server):
    body = {
        "prompt": "Tell me",
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with requests.post(server.base_url + "/v1/completions", json=body, stream=True) as r:
        chunks = sse_json(r)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    full = requests.post(server.base_url + "/v1/completions", json={**body, "stream": False}).json()
    assert text == full["choices"][0]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "length"


def test_chat_completions(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    body = {
        "model": "tiny-model",
        "messages": messages,
        "max_tokens": 6,
        "temperature": 0,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
    }
    out = requests.post(server.base_url + "/v1/chat/completions", json=body).json()
    assert out["object"] == "chat.completion" and len(out["choices"]) == 2
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert len(out["choices"][0]["logprobs"]["content"]) == 6
    assert len(out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    # the prompt is the chat template's rendering
    from transformers import AutoTokenizer

    info = requests.get(server.base_url + "/get_model_info").json()
    tok = AutoTokenizer.from_pretrained(info["tokenizer_path"])
    ids = tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == 12
    native = requests.post(
        server.base_url + "/generate",
        json={"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 6}},
    ).json()
    assert msg["content"] == native["text"]


def test_chat_stream(server):
    body = {
        "messages": [{"role": "user", "content": "Count"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with requests.post(server.base_url + "/v1/chat/completions", json=body, stream=True) as r:
        chunks = sse_json(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    full = requests.post(server.base_url + "/v1/chat/completions", json={**body, "stream": False}).json()
    assert content == full["choices"][0]["message"]["content"]
    assert (
        chunks[-2]["choices"][0]["finish_reason"] == "length"
        and chunks[-1]["usage"]["completion_tokens"] == 5
    )


def test_chat_assistant_prefill(server):
    messages = [{"role": "user", "content": "JSON please"}, {"role": "assistant", "content": "{\n"}]
    out = requests.post(
        server.base_url + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 3, "temperature": 0},
    ).json()
    without = requests.post(
        server.base_url + "/v1/chat/completions",
        json={"messages": messages[:1], "max_tokens": 3, "temperature": 0},
    ).json()
    assert out["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]
