"""Engine.tokenize / detokenize and Engine.score (SGLang 0.5's /tokenize, /detokenize, /v1/score),
checked against the tokenizer itself and against transformers' next-token probabilities."""

from __future__ import annotations

import asyncio
import math
import re

import pytest
import torch

from research_rt.core.errors import RequestError
from research_rt.frontend.score_input import ScoreInput

QUERY = "The capital of France is"
ITEMS = [" Paris", " London", " a"]


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def hf_next_probs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)


# ---------------------------------------------------------------- tokenize
def test_tokenize_prompt_list_and_chat(tiny_engine):
    tok = tiny_engine.tokenizer
    out = tiny_engine.tokenize("Hello world")
    assert out == {
        "tokens": tok.encode("Hello world"),
        "count": len(tok.encode("Hello world")),
        "max_model_len": tiny_engine.context_len,
    }
    batch = tiny_engine.tokenize(["a b", "The capital"])
    assert batch["tokens"] == [tok.encode("a b"), tok.encode("The capital")]
    assert batch["count"] == [len(t) for t in batch["tokens"]]
    chat = [{"role": "user", "content": "Hi there"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    out = tiny_engine.tokenize(messages=chat)
    assert out["tokens"] == tok.encode(rendered, add_special_tokens=False)
    assert out["count"] == len(out["tokens"])
    bare = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    assert tiny_engine.tokenize(messages=chat, add_generation_prompt=False)["tokens"] == tok.encode(bare)
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}
    ]
    assert tiny_engine.tokenize(messages=parts)["tokens"] == out["tokens"]


def test_detokenize_roundtrip_and_special_tokens(tiny_engine):
    tok = tiny_engine.tokenizer
    ids = tok.encode("Hello world, again")
    assert tiny_engine.detokenize(ids) == {"text": "Hello world, again"}
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tiny_engine.detokenize(ids + [end])["text"] == "Hello world, again"
    assert (
        tiny_engine.detokenize(ids + [end], skip_special_tokens=False)["text"]
        == "Hello world, again<|im_end|>"
    )
    assert tiny_engine.detokenize([ids, [end]], skip_special_tokens=False) == {
        "text": ["Hello world, again", "<|im_end|>"]
    }
    assert tiny_engine.detokenize([]) == {"text": ""}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.tokenize(), "exactly one of 'prompt'"),
        (lambda e: e.tokenize("a", messages=[{"role": "user", "content": "b"}]), "exactly one of 'prompt'"),
        (lambda e: e.tokenize(123), "Field 'prompt'"),
        (lambda e: e.tokenize([]), "Field 'prompt'"),
        (lambda e: e.tokenize("a", add_special_tokens="yes"), "Field 'add_special_tokens'"),
        (lambda e: e.tokenize(messages=[]), "Field 'messages'"),
        (lambda e: e.tokenize(messages=[{"role": "robot", "content": "x"}]), "Field 'messages[0]'"),
        (lambda e: e.tokenize(messages=[{"role": "user", "content": 5}]), "Field 'messages[0].content'"),
        (lambda e: e.detokenize("abc"), "Field 'tokens'"),
        (lambda e: e.detokenize([1, "x"]), "Field 'tokens'"),
        (lambda e: e.detokenize([True]), "Field 'tokens'"),
        (lambda e: e.detokenize([1, 10**9]), "Field 'tokens' has token id 1000000000"),
        (lambda e: e.detokenize([[1], [-1]]), "Field 'tokens[1]'"),
        (lambda e: e.detokenize([1], skip_special_tokens=1), "Field 'skip_special_tokens'"),
    ],
)
def test_tokenize_validation(tiny_engine, call, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        call(tiny_engine)


# ---------------------------------------------------------------- score
def test_score_matches_transformers(tiny_engine, hf_model):
    tok = tiny_engine.tokenizer
    labels = [tok.encode(" yes")[0], tok.encode(" no")[0], 5, 1000]
    scores = tiny_engine.score(QUERY, ITEMS, labels)
    soft = tiny_engine.score(QUERY, ITEMS, labels, apply_softmax=True)
    first = tiny_engine.score(QUERY, ITEMS, labels, item_first=True)
    assert len(scores) == len(soft) == len(first) == len(ITEMS)
    for item, row, srow, frow in zip(ITEMS, scores, soft, first):
        probs = hf_next_probs(hf_model, tok.encode(QUERY + item))[labels]
        assert row == pytest.approx(probs.tolist(), rel=1e-3, abs=1e-9)
        assert srow == pytest.approx((probs / probs.sum()).tolist(), rel=1e-3)
        assert math.fsum(srow) == pytest.approx(1.0)
        fprobs = hf_next_probs(hf_model, tok.encode(item + QUERY))[labels]
        assert frow == pytest.approx(fprobs.tolist(), rel=1e-3, abs=1e-9)
    tiny_engine.check_pool_integrity()


def test_score_token_ids_share_the_query_prefix(tiny_engine, hf_model):
    g = torch.Generator().manual_seed(7)
    query = torch.randint(3, 40000, (24,), generator=g).tolist()
    items = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (3, 5, 4)]
    labels = [17, 99, 1234]
    out = asyncio.run(tiny_engine.async_score(ScoreInput(query, items, labels)))
    for item, row in zip(items, out["scores"]):
        probs = hf_next_probs(hf_model, query + item)[labels]
        assert row == pytest.approx(probs.tolist(), rel=1e-3, abs=1e-9)
    usage = out["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] == sum(len(query) + len(i) for i in items)
    assert usage["completion_tokens"] == 0
    # every item prefilled only its own tokens: the query came from the prefix cache
    assert usage["prompt_tokens_details"]["cached_tokens"] >= len(items) * len(query)
    tiny_engine.check_pool_integrity()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(query="q", items=["a"], label_token_ids=None), "Field 'label_token_ids'"),
        (dict(query="q", items=["a"], label_token_ids=[]), "Field 'label_token_ids'"),
        (dict(query="q", items=["a"], label_token_ids=[10**9]), "Field 'label_token_ids' has token id"),
        (dict(query=None, items=["a"], label_token_ids=[1]), "Field 'query'"),
        (dict(query="q", items=None, label_token_ids=[1]), "Field 'items'"),
        (dict(query="q", items=[[1, 2]], label_token_ids=[1]), "both be text"),
        (dict(query=[1, 2], items=["a"], label_token_ids=[1]), "both be text"),
        (dict(query=[1, 10**9], items=[[1]], label_token_ids=[1]), "Field 'query' has token id"),
        (dict(query=[1], items=[[1], [-3]], label_token_ids=[1]), "Field 'items\\[1\\]'"),
        (dict(query=5, items=["a"], label_token_ids=[1]), "Field 'query' must be"),
        (dict(query="q", items=["a"], label_token_ids=[1], apply_softmax="no"), "Field 'apply_softmax'"),
        (dict(query="q", items=["a"], label_token_ids=[1], item_first=1), "Field 'item_first'"),
    ],
)
def test_score_validation(tiny_engine, kwargs, message):
    with pytest.raises(RequestError, match=message):
        tiny_engine.score(**kwargs)
