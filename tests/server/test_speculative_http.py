"""/generate reports SGLang's speculative fields with --speculative-algorithm NGRAM; the OpenAI
routes answer as usual."""

from __future__ import annotations

import requests


def test_generate_reports_spec_fields(tiny_server_factory):
    server = tiny_server_factory(["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "4"])
    text = "one two three four five six seven " * 6
    body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}}
    r = requests.post(server.base_url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert meta["completion_tokens"] == 24
    assert isinstance(meta["spec_verify_ct"], int) and meta["spec_verify_ct"] >= 0
    assert meta["spec_accept_token_num"] <= meta["spec_draft_token_num"]
    assert 0.0 <= meta["spec_accept_rate"] <= 1.0
    r = requests.post(
        server.base_url + "/v1/completions",
        json={"model": "x", "prompt": text, "max_tokens": 8, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    assert server.wait_idle_and_whole()["kv_pool_whole"] is True
