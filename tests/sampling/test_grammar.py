"""Structured generation on the tiny random Llama: the constraint alone must make outputs valid.

The weights are random, so nothing but the grammar mask keeps the text in shape; every test samples
at temperature 1 over many seeds.
"""

from __future__ import annotations

import json
import re

import pytest

from research_rt.core.errors import RequestError
from research_rt.sampling.custom_logit_processor import CustomLogitProcessor
from tests.conftest import eager_engine

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["red", "green", "blue"]},
    },
    "required": ["id", "ok", "tag"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}-[0-9]{1,3}"
EBNF = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
EBNF_RE = r"\((\d|[1-9]\d)(\+(\d|[1-9]\d))*\)"


def sampled(seed: int, **extra) -> dict:
    return {"temperature": 1.0, "max_new_tokens": 120, "sampling_seed": seed, **extra}


def test_json_schema_always_validates(tiny_engine):
    params = [sampled(s, json_schema=json.dumps(SCHEMA)) for s in range(20)]
    outs = tiny_engine.generate(["Give me JSON:"] * 20, params)
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    tiny_engine.check_pool_integrity()


def test_regex_and_ebnf_always_full_match(tiny_engine):
    outs = tiny_engine.generate(["code:"] * 16, [sampled(s, regex=REGEX) for s in range(16)])
    outs += tiny_engine.generate(["sum:"] * 16, [sampled(s, ebnf=EBNF, max_new_tokens=40) for s in range(16)])
    for out, pattern in zip(outs, [REGEX] * 16 + [EBNF_RE] * 16):
        if out["meta_info"]["finish_reason"]["type"] == "length":  # an EBNF sum may run on; still a prefix
            assert pattern == EBNF_RE and re.fullmatch(r"\([0-9+]*", out["text"]), out
            continue
        assert re.fullmatch(pattern, out["text"]), out["text"]
    assert sum(o["meta_info"]["finish_reason"]["type"] == "stop" for o in outs[16:]) >= 8
    tiny_engine.check_pool_integrity()


def test_invalid_grammars_are_client_errors(tiny_engine):
    cases = [
        ({"regex": "(abc"}, "Regex parsing error"),
        ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
        ({"json_schema": '{"type": "no-such-type"}'}, "could not be compiled"),
        ({"ebnf": "root ::= undefined_rule"}, 'Rule "undefined_rule" is not defined'),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "Only one of regex, json_schema, or ebnf can be set."),
    ]
    for sp, reason in cases:
        with pytest.raises(RequestError) as err:
            tiny_engine.generate("x", {"max_new_tokens": 4, **sp})
        assert reason in err.value.message, err.value.message
        assert "[" not in err.value.message.split(":")[0]  # no C++ log prefix
    tiny_engine.check_pool_integrity()


def test_mixed_batch_leaves_unconstrained_outputs_alone(tiny_engine):
    free = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    prompts = ["alpha beta", "gamma", "delta epsilon zeta"]
    solo = [tiny_engine.generate(p, free)["output_ids"] for p in prompts]
    params = [free, sampled(1, regex=REGEX), free, sampled(2, json_schema=json.dumps(SCHEMA)), free]
    outs = tiny_engine.generate([prompts[0], "c", prompts[1], "j", prompts[2]], params)
    assert [outs[i]["output_ids"] for i in (0, 2, 4)] == solo
    assert re.fullmatch(REGEX, outs[1]["text"])
    jsonschema.validate(json.loads(outs[3]["text"]), SCHEMA)


def test_n_samples_and_streaming_with_a_grammar(tiny_engine):
    outs = tiny_engine.generate("pick:", sampled(3, regex="(cat|dog|bird)( (cat|dog|bird))*", n=6))
    assert len(outs) == 6
    assert all(re.fullmatch("(cat|dog|bird)( (cat|dog|bird))*", o["text"]) for o in outs)
    chunks = list(tiny_engine.generate("code:", sampled(4, regex=REGEX), stream=True))
    texts = [c["text"] for c in chunks]
    assert len(chunks) > 2 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert re.fullmatch(REGEX, texts[-1]) and chunks[-1]["meta_info"]["finish_reason"]["type"] == "stop"
    tiny_engine.check_pool_integrity()


def test_logprobs_are_of_the_masked_distribution(tiny_engine):
    tok = tiny_engine.tokenizer
    out = tiny_engine.generate(
        "Answer:",
        sampled(5, regex="( Yes| No)", max_new_tokens=1),
        return_logprob=True,
        top_logprobs_num=5,
    )
    top = out["meta_info"]["output_top_logprobs"][0]
    allowed = [(lp, tid) for lp, tid, _ in top if lp > -1e30]  # the rest are clamped -inf
    assert allowed and all(
        " Yes".startswith(tok.decode([t])) or " No".startswith(tok.decode([t])) for _, t in allowed
    )
    chosen_lp, chosen = out["meta_info"]["output_token_logprobs"][0][:2]
    assert chosen in [t for _, t in allowed] and chosen_lp > -1e30
    json.dumps(out, allow_nan=False)  # no inf / NaN reaches a response


def test_radix_cache_hit_keeps_the_constraint(tiny_engine):
    prompt = "shared prefix " * 8
    first = tiny_engine.generate(prompt, sampled(6, regex=REGEX))
    second = tiny_engine.generate(prompt, sampled(7, regex=REGEX))
    assert second["meta_info"]["cached_tokens"] > 0
    assert re.fullmatch(REGEX, first["text"]) and re.fullmatch(REGEX, second["text"])


def test_custom_logit_processor_needs_the_flag(tiny_engine):
    with pytest.raises(RequestError, match="--enable-custom-logit-processor"):
        tiny_engine.generate("x", {"max_new_tokens": 2}, custom_logit_processor=ForceToken.to_str())


class ForceToken(CustomLogitProcessor):
    """Every row may only produce `custom_params["token_id"]` (SGLang's DeterministicLogitProcessor)."""

    def __call__(self, logits, custom_param_list=None):
        assert logits.shape[0] == len(custom_param_list)
        for i, params in enumerate(custom_param_list):
            logits[i, :] = -float("inf")
            logits[i, params["token_id"]] = 0.0
        return logits


class Explodes(CustomLogitProcessor):
    def __call__(self, logits, custom_param_list=None):
        raise ValueError("boom")


@pytest.fixture(scope="module")
def small_pool_engine(tiny_llama_dir):
    """Custom processors on, and a KV pool small enough to force retraction."""
    engine = eager_engine(
        str(tiny_llama_dir), dtype="float32", max_total_tokens=400, enable_custom_logit_processor=True
    )
    yield engine
    engine.shutdown()


def test_custom_logit_processor_forces_tokens(small_pool_engine):
    proc = ForceToken.to_str()
    params = [
        {"temperature": 1.0, "max_new_tokens": 8, "custom_params": {"token_id": 5 + i}} for i in range(3)
    ]
    outs = small_pool_engine.generate(
        ["a", "b", "c"], params, custom_logit_processor=proc, return_logprob=True
    )
    for i, out in enumerate(outs):
        assert out["output_ids"] == [5 + i] * 8
        assert [e[1] for e in out["meta_info"]["output_token_logprobs"]] == [5 + i] * 8
    free = small_pool_engine.generate("a", {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
    assert free["output_ids"] != [5] * 8  # the processor stays with its own requests
    small_pool_engine.check_pool_integrity()


def test_python_logit_processor_hook(small_pool_engine):
    def only_seven(row, req):
        row[:] = -float("inf")
        row[7] = 0.0
        return row

    out = small_pool_engine.generate("a", {"max_new_tokens": 5}, logit_processor=only_seven)
    assert out["output_ids"] == [7] * 5


def test_failing_processor_aborts_only_its_request(small_pool_engine):
    bad = small_pool_engine.generate("a", {"max_new_tokens": 4}, custom_logit_processor=Explodes.to_str())
    reason = bad["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 400 and "boom" in reason["message"]
    with pytest.raises(RequestError, match="could not be deserialized"):
        small_pool_engine.generate("a", {"max_new_tokens": 4}, custom_logit_processor='{"callable": "zz"}')
    small_pool_engine.check_pool_integrity()


def test_grammar_survives_retraction(small_pool_engine):
    """Retract constrained requests mid-generation (as a full pool would): on resume the scheduler
    re-prefills input + output, and the matcher must carry on without being re-fed those tokens."""
    engine = small_pool_engine
    retracted: set[str] = set()

    def retract_once(s) -> None:
        for r in list(s.running):
            if r.grammar is not None and r.rid not in retracted and len(r.output_ids) >= 6:
                retracted.add(r.rid)
                assert r.grammar.num_accepted == len(r.output_ids)
                s.running.remove(r)
                s.decode_room.retract(r, s.waiting)

    engine.scheduler.step_hooks.append(retract_once)
    try:
        schema = json.dumps(SCHEMA)
        params = [sampled(s, json_schema=schema, max_new_tokens=100) for s in range(6)]
        outs = engine.generate([f"request {i} " * 4 for i in range(6)], params)
    finally:
        engine.scheduler.step_hooks.remove(retract_once)
    assert len(retracted) == 6
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out["meta_info"]["finish_reason"]
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    engine.check_pool_integrity()
