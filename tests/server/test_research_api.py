"""SGLang 0.5's endpoints over real HTTP (a server subprocess on the tiny Llama): /tokenize and
/detokenize (and /v1/), /v1/score, /pause_generation and /continue_generation, the weight
version, /update_weights_from_tensor (safetensors in base64), /weights_checker, `priority`."""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file, save

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
LONG = {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(tiny_server_factory):
    return tiny_server_factory(["--enable-priority-scheduling"])


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def post(server, path: str, body=None) -> requests.Response:
    return requests.post(server.base_url + path, json=body, timeout=120)


def gen(server, params=GREEDY, **extra) -> dict:
    r = post(server, "/generate", {"text": PROMPT, "sampling_params": params, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def blob(tensors: dict[str, torch.Tensor]) -> str:
    return base64.b64encode(save(tensors)).decode()


def checkpoint_blob(directory: Path) -> str:
    return blob(load_file(directory / "model.safetensors"))


class Stream:
    """A streaming /generate read on a thread; `events` holds (time, event) as they arrive."""

    def __init__(self, server, params=LONG) -> None:
        self.events: list[tuple[float, dict]] = []
        body = {"text": PROMPT, "sampling_params": params, "stream": True}
        self.resp = requests.post(server.base_url + "/generate", json=body, stream=True, timeout=300)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.resp.iter_lines(decode_unicode=True):
            if line and line != "data: [DONE]":
                self.events.append((time.monotonic(), json.loads(line[6:])))

    def wait_for(self, n: int) -> None:
        deadline = time.monotonic() + 60
        while len(self.events) < n:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the stream stalled"
            time.sleep(0.01)

    def final(self) -> dict:
        self.thread.join(300)
        return self.events[-1][1]


# ---------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_tokenize_and_detokenize(server, tokenizer, prefix):
    info = requests.get(server.base_url + "/get_server_info").json()
    r = post(server, f"{prefix}/tokenize", {"prompt": PROMPT, "model": "ignored"})
    ids = tokenizer.encode(PROMPT)
    assert r.status_code == 200 and r.json() == {
        "tokens": ids,
        "count": len(ids),
        "max_model_len": info["context_len"],
    }
    r = post(server, f"{prefix}/tokenize", {"prompt": ["a b", PROMPT], "add_special_tokens": False})
    assert r.json()["tokens"] == [tokenizer.encode("a b"), ids] and r.json()["count"] == [2, len(ids)]
    chat = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert post(server, f"{prefix}/tokenize", {"messages": chat}).json()["tokens"] == tokenizer.encode(text)
    r = post(server, f"{prefix}/detokenize", {"tokens": ids})
    assert r.status_code == 200 and r.json() == {"text": PROMPT}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    r = post(server, f"{prefix}/detokenize", {"tokens": [ids, [end]], "skip_special_tokens": False})
    assert r.json() == {"text": [PROMPT, "<|im_end|>"]}


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/tokenize", {}, "Provide exactly one of 'prompt'"),
        ("/tokenize", {"prompt": 5}, "Field 'prompt' must be a string or a non-empty list of strings."),
        (
            "/tokenize",
            {"prompt": "a", "add_special_tokens": "no"},
            "Field 'add_special_tokens' must be a boolean",
        ),
        ("/tokenize", {"messages": [{"role": "cat"}]}, "Field 'messages[0]' must be an object with a role"),
        ("/detokenize", {}, "Field 'tokens' (a list of token ids) is required."),
        (
            "/detokenize",
            {"tokens": [1, "a"]},
            "Field 'tokens' must be a list of token ids or a list of such lists.",
        ),
        (
            "/detokenize",
            {"tokens": [99999999]},
            "Field 'tokens' has token id 99999999, outside the vocabulary",
        ),
    ],
)
def test_tokenize_errors(server, path, body, message):
    r = post(server, path, body)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(message)
    r = post(server, "/v1" + path, body)  # the OpenAI-style error body under /v1/
    assert r.status_code == 400 and r.json()["object"] == "error" and r.json()["message"].startswith(message)


# ---------------------------------------------------------------- score
def test_score_matches_generate_logprobs(server, tokenizer):
    labels = [tokenizer.encode(" Paris")[0], tokenizer.encode(" London")[0], 7]
    items = [" Paris", " London", " the"]
    body = {"query": PROMPT, "items": items, "label_token_ids": labels}
    r = post(server, "/v1/score", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (
        out["object"] == "scoring"
        and out["model"] == requests.get(server.base_url + "/v1/models").json()["data"][0]["id"]
    )
    prompt_tokens = sum(len(tokenizer.encode(PROMPT + i)) for i in items)
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] == prompt_tokens
    assert (
        out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    )
    for item, row in zip(items, out["scores"]):
        meta = post(
            server,
            "/generate",
            {
                "text": PROMPT + item,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                "return_logprob": True,
                "token_ids_logprob": labels,
            },
        ).json()["meta_info"]
        expect = [math.exp(lp) for lp, _, _ in meta["output_token_ids_logprobs"][0]]
        assert row == pytest.approx(expect, rel=1e-4)
    soft = post(server, "/v1/score", {**body, "apply_softmax": True, "item_first": True}).json()["scores"]
    assert all(math.fsum(row) == pytest.approx(1.0) for row in soft)
    ids = post(server, "/v1/score", {"query": [5, 6, 7], "items": [[8], [9, 10]], "label_token_ids": [1, 2]})
    assert ids.status_code == 200 and len(ids.json()["scores"]) == 2


@pytest.mark.parametrize(
    "body, message",
    [
        ({"query": "q", "items": ["a"]}, "Field 'label_token_ids' must be a non-empty list of token ids."),
        (
            {"query": "q", "items": [[1]], "label_token_ids": [1]},
            "Fields 'query' and 'items' must both be text",
        ),
        ({"items": ["a"], "label_token_ids": [1]}, "Field 'query' is required"),
        ({"query": "q", "label_token_ids": [1]}, "Field 'items' is required"),
        (
            {"query": "q", "items": ["a"], "label_token_ids": [1], "apply_softmax": "y"},
            "Field 'apply_softmax'",
        ),
    ],
)
def test_score_errors(server, body, message):
    r = post(server, "/v1/score", body)
    assert r.status_code == 400 and r.json()["message"].startswith(message)


# ---------------------------------------------------------------- pause
def test_pause_in_place_and_continue_keep_the_output(server):
    ref = gen(server, LONG)["output_ids"]
    stream = Stream(server)
    stream.wait_for(5)
    r = post(server, "/pause_generation", {"mode": "in_place"})
    assert r.status_code == 200 and r.json() == {"message": "Generation paused successfully.", "status": "ok"}
    paused_at = time.monotonic()
    time.sleep(0.6)
    info = requests.get(server.base_url + "/get_server_info").json()
    assert info["num_running_reqs"] == 1 and info["num_used_tokens"] > 0  # its KV is kept
    continued_at = time.monotonic()
    assert [t for t, _ in stream.events if paused_at + 0.1 < t < continued_at] == []
    r = post(server, "/continue_generation")
    assert r.status_code == 200 and r.json() == {
        "message": "Generation continued successfully.",
        "status": "ok",
    }
    final = stream.final()
    assert final["output_ids"] == ref and final["meta_info"]["finish_reason"]["type"] == "length"
    assert server.wait_idle_and_whole()["kv_pool_whole"] is True


def test_requests_sent_while_paused_wait(server):
    ref = gen(server)["output_ids"]
    assert post(server, "/pause_generation").status_code == 200  # mode abort by default
    result: dict = {}
    t = threading.Thread(
        target=lambda: result.update(r=post(server, "/generate", {"text": PROMPT, "sampling_params": GREEDY}))
    )
    t.start()
    t.join(1.0)
    assert t.is_alive(), "a request sent while paused did not wait"
    assert requests.get(server.base_url + "/get_load").json()[0]["num_waiting_reqs"] == 1
    tic = time.monotonic()  # a paused server is alive: no probe that would wait for continue
    assert requests.get(server.base_url + "/health_generate", timeout=30).status_code == 200
    assert time.monotonic() - tic < 2.0
    post(server, "/continue_generation")
    t.join(60)
    assert result["r"].status_code == 200 and result["r"].json()["output_ids"] == ref
    r = post(server, "/pause_generation", {"mode": "later"})
    assert r.status_code == 400
    assert (
        r.json()["error"]["message"] == "Field 'mode' must be one of abort, retract, in_place, got 'later'."
    )


def test_abort_pause_ends_running_requests(server):
    stream = Stream(server)
    stream.wait_for(3)
    assert post(server, "/pause_generation", {"mode": "abort"}).status_code == 200
    assert stream.final()["meta_info"]["finish_reason"]["type"] == "abort"
    post(server, "/continue_generation")
    assert server.wait_idle_and_whole()["kv_pool_whole"] is True


# ---------------------------------------------------------------- refit
def test_refit_flow_retract_update_from_tensor_continue(server, tiny_dir, tiny_dir_b):
    """The RL loop: pause (retract) with a request in flight, load new weights from tensors (no
    wait for the paused request), flush, version, continue: the request finishes, on the new weights."""
    base = gen(server)["output_ids"]
    stream = Stream(server, {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True})
    stream.wait_for(3)
    assert post(server, "/pause_generation", {"mode": "retract"}).status_code == 200
    assert requests.get(server.base_url + "/get_load").json()[0]["num_waiting_reqs"] == 1
    r = post(
        server,
        "/update_weights_from_tensor",
        {
            "serialized_named_tensors": [checkpoint_blob(tiny_dir_b)],
            "weight_version": "b",
            "flush_cache": False,
        },
    )
    assert r.status_code == 200
    assert r.json() == {
        "success": True,
        "message": "Succeeded to update model weights. Weight version updated to b.",
    }
    assert post(server, "/flush_cache").status_code == 200  # allowed: the paused request holds no KV
    assert post(server, "/continue_generation").status_code == 200
    final = stream.final()
    assert (
        final["meta_info"]["finish_reason"]["type"] == "length"
        and final["meta_info"]["weight_version"] == "b"
    )
    out_b = gen(server)
    assert out_b["output_ids"] != base and out_b["meta_info"]["weight_version"] == "b"
    # the same weights loaded from disk give the same tokens
    assert post(server, "/update_weights_from_disk", {"model_path": str(tiny_dir_b)}).json()["success"]
    assert gen(server)["output_ids"] == out_b["output_ids"]
    assert post(server, "/update_weights_from_disk", {"model_path": str(tiny_dir)}).json()["success"]
    assert gen(server)["output_ids"] == base
    post(server, "/update_weight_version", {"new_version": "default"})


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "Field 'serialized_named_tensors' must be a non-empty list"),
        ({"serialized_named_tensors": ["%%%"]}, "Field 'serialized_named_tensors[0]' is not valid base64"),
        (
            {"serialized_named_tensors": [base64.b64encode(b"nope").decode()]},
            "Field 'serialized_named_tensors[0]' is not a safetensors blob",
        ),
        (
            {"serialized_named_tensors": [blob({"x": torch.zeros(1)})], "flush_cache": "no"},
            "Field 'flush_cache' must be a boolean.",
        ),
        (
            {"serialized_named_tensors": [blob({"x": torch.zeros(1)})], "load_format": 3},
            "Field 'load_format'",
        ),
        (
            {"serialized_named_tensors": [blob({"x": torch.zeros(1)})], "weight_version": 3},
            "Field 'weight_version'",
        ),
        (
            {"serialized_named_tensors": [blob({"x": torch.zeros(1)})], "load_format": "pt"},
            "Unsupported load_format 'pt'",
        ),
        (
            {"serialized_named_tensors": [blob({"model.nope.weight": torch.zeros(1)})]},
            "Failed to update weights:",
        ),
    ],
)
def test_update_from_tensor_errors(server, body, message):
    before = gen(server)["output_ids"]
    r = post(server, "/update_weights_from_tensor", body)
    assert (
        r.status_code == 400 and r.json()["success"] is False and r.json()["message"].startswith(message)
    ), r.text
    assert gen(server)["output_ids"] == before


def test_weight_version(server):
    assert requests.get(server.base_url + "/get_weight_version").json() == {"weight_version": "default"}
    r = post(server, "/update_weight_version", {"new_version": "v1"})
    assert r.status_code == 200
    assert r.json() == {"success": True, "message": "Weight version updated to v1", "new_version": "v1"}
    assert gen(server)["meta_info"]["weight_version"] == "v1"
    assert requests.get(server.base_url + "/get_server_info").json()["weight_version"] == "v1"
    assert requests.get(server.base_url + "/get_weight_version").json() == {"weight_version": "v1"}
    r = post(server, "/update_weight_version", {})
    assert r.status_code == 400 and r.json() == {
        "success": False,
        "message": "Field 'new_version' (a non-empty string) is required.",
    }
    r = post(server, "/update_weight_version", {"new_version": "v2", "abort_all_requests": "yes"})
    assert r.status_code == 400 and r.json()["message"] == "Field 'abort_all_requests' must be a boolean."
    assert (
        post(
            server, "/update_weight_version", {"new_version": "default", "abort_all_requests": True}
        ).status_code
        == 200
    )


def test_weights_checker(server, tiny_dir):
    r = post(server, "/weights_checker", {"action": "checksum"})
    assert r.status_code == 200
    body = r.json()
    rank = body["ranks"][0]
    assert body["success"] and len(rank["checksums"]) == 15 and len(rank["per_gpu_checksum"]) == 64
    assert "model.norm.weight" in rank["checksums"] and body["per_engine_checksum"]
    assert post(server, "/weights_checker", {"action": "snapshot"}).json()["success"]
    assert post(server, "/weights_checker", {"action": "compare"}).json() == {
        "success": True,
        "message": "All 15 tensors equal the snapshot.",
    }
    norm = load_file(tiny_dir / "model.safetensors")["model.norm.weight"]
    assert post(
        server,
        "/update_weights_from_tensor",
        {"serialized_named_tensors": [blob({"model.norm.weight": norm * 3})]},
    ).json()["success"]
    r = post(server, "/weights_checker", {"action": "compare"})
    assert (
        r.status_code == 400 and r.json()["success"] is False and "model.norm.weight" in r.json()["message"]
    )
    assert post(server, "/weights_checker").json()["ranks"][0]["per_gpu_checksum"] != rank["per_gpu_checksum"]
    assert post(
        server, "/update_weights_from_tensor", {"serialized_named_tensors": [checkpoint_blob(tiny_dir)]}
    ).json()["success"]
    assert post(server, "/weights_checker", {"action": "compare"}).status_code == 200
    assert post(server, "/weights_checker").json()["ranks"][0] == rank
    for body, message in (
        ({"action": "weigh"}, "Field 'action' must be one of"),
        ({"action": 1}, "Field 'action' must be a string."),
    ):
        r = post(server, "/weights_checker", body)
        assert r.status_code == 400 and r.json()["message"].startswith(message)


def test_priority_field(server):
    assert gen(server, priority=5)["meta_info"]["finish_reason"]["type"] == "length"
    r = post(server, "/generate", {"text": [PROMPT, "Hi"], "sampling_params": GREEDY, "priority": [1, 30]})
    assert r.status_code == 200 and len(r.json()) == 2
    r = post(server, "/generate", {"text": PROMPT, "priority": "high"})
    assert r.status_code == 400
    assert (
        r.json()["error"]["message"]
        == "Field 'priority' must be an integer or a list of integers, got string."
    )
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    for path, body in (
        ("/v1/chat/completions", chat),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 4}),
    ):
        assert post(server, path, {**body, "priority": 7}).status_code == 200
        r = post(server, path, {**body, "priority": "high"})
        assert r.status_code == 400 and r.json()["message"].startswith(
            "Field 'priority' must be an integer"
        ), r.text
