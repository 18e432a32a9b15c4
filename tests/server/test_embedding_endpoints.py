"""/encode, /classify, /v1/embeddings and the expert-distribution endpoints on tiny checkpoints."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import requests
from server_harness import TINY_ARGS, start_server, stop_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import make_tiny_checkpoint  # noqa: E402


def post(server, path, body=None):
    return requests.post(server.base_url + path, json=body, timeout=60)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_dir):
    started = []

    def start(args, cwd=None):
        log = tmp_path_factory.mktemp("server") / "server.log"
        s = start_server([*args, *TINY_ARGS], log, cwd=cwd)
        started.append(s)
        return s

    yield start
    for s in started:
        stop_server(s)


def test_decoder_embedding_server(servers, tiny_dir):
    server = servers(["--model-path", str(tiny_dir), "--is-embedding"])
    assert requests.get(server.base_url + "/get_model_info").json()["is_generation"] is False
    one = post(server, "/encode", {"text": "Once upon a time"})
    assert one.status_code == 200
    body = one.json()
    assert len(body["embedding"]) == 64 and abs(sum(x * x for x in body["embedding"]) - 1) < 1e-4
    meta = body["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 0} and meta["prompt_tokens"] > 0
    assert set(meta) == {"id", "finish_reason", "prompt_tokens", "weight_version", "e2e_latency"}
    assert meta["weight_version"] == "default"
    batch = post(server, "/encode", {"text": ["Once upon a time", "Hello"], "rid": ["a", "b"]}).json()
    assert [b["meta_info"]["id"] for b in batch] == ["a", "b"]
    assert batch[0]["embedding"] == pytest.approx(body["embedding"], abs=1e-5)
    assert len(post(server, "/encode", {"input_ids": [[1, 2, 3]]}).json()) == 1  # batch of one
    r = post(server, "/encode", {"input_ids": [1, 10**9]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = post(server, "/generate", {"text": "hi"})
    assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
    r = post(server, "/v1/embeddings", {"model": "m", "input": ["Once upon a time", "Hello"]})
    out = r.json()
    assert r.status_code == 200 and out["object"] == "list" and [d["index"] for d in out["data"]] == [0, 1]
    assert out["data"][0]["embedding"] == pytest.approx(body["embedding"], abs=1e-5)
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] == meta["prompt_tokens"] + 1
    ids = post(server, "/v1/embeddings", {"model": "m", "input": [1, 2, 3]}).json()
    assert len(ids["data"]) == 1 and ids["usage"]["prompt_tokens"] == 3
    assert requests.get(server.base_url + "/health_generate", timeout=30).status_code == 200
    r = post(server, "/start_expert_distribution_record")
    assert r.status_code == 400 and "not a MoE" in r.json()["error"]["message"]
    assert server.wait_idle_and_whole()["kv_pool_whole"] is True


def test_classify_server(servers, tmp_path_factory, smollm_tokenizer_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = tmp_path_factory.mktemp("rm")
    config = AutoConfig.for_model(
        "qwen2", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=None,
    )  # fmt: skip
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    for f in Path(smollm_tokenizer_dir).iterdir():
        if f.is_file():
            (path / f.name).write_bytes(f.read_bytes())
    server = servers(["--model-path", str(path)])  # detected from the architecture
    texts = ["<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>user\nBye<|im_end|>\n"]
    out = post(server, "/classify", {"text": texts})
    assert out.status_code == 200
    scores = out.json()
    assert len(scores) == 2 and all(len(s["embedding"]) == 1 for s in scores)
    single = post(server, "/classify", {"text": texts[1]}).json()
    assert single["embedding"][0] == pytest.approx(scores[1]["embedding"][0], rel=1e-4)


def test_moe_server_expert_distribution(servers, tmp_path_factory):
    path = make_tiny_checkpoint("MixtralForCausalLM", tmp_path_factory.mktemp("moe"))
    cwd = tmp_path_factory.mktemp("moe_cwd")
    server = servers(["--model-path", str(path), "--skip-tokenizer-init"], cwd=cwd)
    r = post(server, "/encode", {"input_ids": [1, 2]})
    assert r.status_code == 400 and "--is-embedding" in r.json()["error"]["message"]
    r = post(server, "/start_expert_distribution_record")
    assert r.status_code == 200 and r.text == "Start recording the expert distribution.\n"
    sp = {"max_new_tokens": 4, "ignore_eos": True, "temperature": 0}
    assert post(server, "/generate", {"input_ids": [5, 6, 7, 8], "sampling_params": sp}).status_code == 200
    r = requests.get(server.base_url + "/stop_expert_distribution_record")
    assert r.status_code == 200 and r.text == "Stop recording the expert distribution.\n"
    r = post(server, "/dump_expert_distribution_record")
    assert r.status_code == 200 and r.text == "Dump expert distribution record.\n"
    files = list(cwd.glob("expert_distribution_rank0_timestamp*.csv"))
    assert len(files) == 1
    rows = list(csv.reader(files[0].open()))
    assert rows[0] == ["layer_id", "expert_id", "count"] and len(rows) == 1 + 2 * 4
    assert all(len(r) == 3 and all(c.isdigit() for c in r) for r in rows[1:])
    for layer in (0, 1):  # 4 prompt tokens + 3 decode tokens, top-2
        assert sum(int(r[2]) for r in rows[1:] if r[0] == str(layer)) == 7 * 2
