"""Structured generation on the real SmolLM2-135M-Instruct (slow): upstream's logprob-with-grammar
check and the issue's acceptance run, 100 JSON-schema requests at temperature 1, all valid."""

from __future__ import annotations

import json

import pytest

from tests.conftest import eager_engine

jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 16},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    with eager_engine(random_seed=0) as e:
        yield e


def chat(engine, question: str) -> str:
    msgs = [{"role": "user", "content": question}]
    return engine.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_logprob_with_grammar_has_both_choices(engine):
    """SGLang's test_logprob_grammar: under `( Yes| No)` the top 5 hold both answers."""
    out = engine.generate(
        "Question: Is Paris the Capital of France? Answer:",
        {"temperature": 1.0, "max_new_tokens": 1, "regex": "( Yes| No)"},
        return_logprob=True,
        top_logprobs_num=5,
        return_text_in_logprobs=True,
    )
    texts = [x[2] for x in out["meta_info"]["output_top_logprobs"][0]]
    assert " Yes" in texts and " No" in texts, texts


def test_json_schema_100_of_100(engine):
    prompt = chat(engine, "Describe a person as JSON with name, age and city.")
    params = [
        {"temperature": 1.0, "max_new_tokens": 96, "sampling_seed": s, "json_schema": json.dumps(SCHEMA)}
        for s in range(100)
    ]
    outs = engine.generate([prompt] * 100, params)
    valid = 0
    for out in outs:
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
        valid += 1
    assert valid == 100
    engine.check_pool_integrity()
