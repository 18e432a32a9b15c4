"""Structured and steered generation over HTTP: /generate grammars, OpenAI response_format and the
SGLang extras, invalid grammars, and serialized custom logit processors (tiny random Llama)."""

from __future__ import annotations

import json
import re

import pytest
import requests

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "flag": {"type": "boolean"}},
    "required": ["n", "flag"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}-[0-9]{1,3}"

# A processor class defined as a user's script would define it (module __main__), so that dill
# pickles it by value and the server can load it without importing this test module.
FORCE_TOKEN_SRC = """
from research_rt.sampling.custom_logit_processor import CustomLogitProcessor

class ForceToken(CustomLogitProcessor):
    def __call__(self, logits, custom_param_list=None):
        for i, params in enumerate(custom_param_list):
            logits[i, :] = -float("inf")
            logits[i, params["token_id"]] = 0.0
        return logits
"""


def force_token_str() -> str:
    ns: dict = {"__name__": "__main__"}
    exec(FORCE_TOKEN_SRC, ns)  # noqa: S102 - test fixture code
    return ns["ForceToken"].to_str()


@pytest.fixture(scope="module")
def server(tiny_server_factory):
    return tiny_server_factory(["--enable-custom-logit-processor"])


def post(server, path: str, body: dict) -> requests.Response:
    return requests.post(server.base_url + path, json=body, timeout=120)


def sse_events(r) -> list:
    out = []
    for line in r.iter_lines(decode_unicode=True):
        if line == "data: [DONE]":
            return out
        if line:
            out.append(json.loads(line[6:]))
    raise AssertionError("no [DONE]")


def sampled(seed: int, **extra) -> dict:
    return {"temperature": 1.0, "max_new_tokens": 100, "sampling_seed": seed, **extra}


def test_generate_regex_and_json_schema(server):
    r = post(
        server,
        "/generate",
        {"text": ["id:"] * 8, "sampling_params": [sampled(s, regex=REGEX) for s in range(8)]},
    )
    assert r.status_code == 200
    assert all(re.fullmatch(REGEX, o["text"]) for o in r.json()), [o["text"] for o in r.json()]
    sp = sampled(1, json_schema=json.dumps(SCHEMA), n=4)
    r = post(server, "/generate", {"text": "json:", "sampling_params": sp})
    assert r.status_code == 200 and len(r.json()) == 4
    for o in r.json():
        jsonschema.validate(json.loads(o["text"]), SCHEMA)


def test_generate_stream_with_regex(server):
    body = {"text": "id:", "sampling_params": sampled(2, regex=REGEX), "stream": True}
    with requests.post(server.base_url + "/generate", json=body, stream=True, timeout=120) as r:
        events = sse_events(r)
    assert len(events) >= 2 and re.fullmatch(REGEX, events[-1]["text"])


@pytest.mark.parametrize(
    "sp, reason",
    [
        ({"regex": "[a-"}, "Regex parsing error"),
        ({"json_schema": "{oops"}, "json_schema is not valid JSON"),
        ({"ebnf": "root ::= nothing_here"}, "is not defined"),
        ({"regex": "a", "json_schema": "{}"}, "Only one of regex, json_schema, or ebnf can be set."),
    ],
)
def test_invalid_grammar_is_400(server, sp, reason):
    r = post(server, "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 4, **sp}})
    assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
    info = server.wait_idle_and_whole()
    assert info["num_running_reqs"] == 0


def test_custom_logit_processor_over_http(server):
    proc = force_token_str()
    body = {
        "text": ["a", "b"],
        "custom_logit_processor": proc,
        "sampling_params": [{"max_new_tokens": 6, "custom_params": {"token_id": t}} for t in (5, 9)],
        "return_logprob": True,
    }
    r = post(server, "/generate", body)
    assert r.status_code == 200, r.text
    for out, t in zip(r.json(), (5, 9)):
        assert [e[1] for e in out["meta_info"]["output_token_logprobs"]] == [t] * 6
    bad = post(server, "/generate", {"text": "a", "custom_logit_processor": "not json"})
    assert bad.status_code == 400 and "could not be deserialized" in bad.json()["error"]["message"]


def test_chat_response_format_json_schema(server):
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Give me a record."}],
        "temperature": 1.0,
        "max_tokens": 100,
        "n": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA}},
    }
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    r = post(server, "/v1/chat/completions", {**body, "n": 1, "response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)
    bad = post(server, "/v1/chat/completions", {**body, "response_format": {"type": "json_schema"}})
    assert bad.status_code == 400 and "response_format.json_schema.schema" in bad.json()["message"]


def test_completions_regex_extra_and_response_format(server):
    body = {"model": "m", "prompt": "id:", "max_tokens": 30, "temperature": 1.0, "n": 3, "regex": REGEX}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert all(re.fullmatch(REGEX, c["text"]) for c in r.json()["choices"])
    fmt = {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA}}
    body = {"model": "m", "prompt": "json:", "max_tokens": 100, "temperature": 1.0, "response_format": fmt}
    with requests.post(server.base_url + "/v1/completions", json={**body, "stream": True}, stream=True) as r:
        text = "".join(c["choices"][0]["text"] for c in sse_events(r) if c["choices"])
    jsonschema.validate(json.loads(text), SCHEMA)
    bad = post(server, "/v1/completions", {**body, "regex": "a"})
    assert bad.status_code == 400 and "Only one of" in bad.json()["message"]


def test_custom_logit_processor_refused_without_the_flag(tiny_server_factory):
    plain = tiny_server_factory([])
    r = post(plain, "/generate", {"text": "a", "custom_logit_processor": force_token_str()})
    assert r.status_code == 400 and "--enable-custom-logit-processor" in r.json()["error"]["message"]
