"""N-gram speculative decoding gives exactly the greedy tokens of normal decoding, stops where
normal decoding stops, accepts drafts on copy-heavy prompts and leaves the KV pool whole."""

from __future__ import annotations

import random

import pytest

from tests.conftest import eager_engine

SPEC = {"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 4}


def copy_prompts(n: int, seed: int) -> list[list[int]]:
    """Half repeat a random phrase (drafts hit), half are random (no drafts at first)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        phrase = [rng.randrange(3, 49000) for _ in range(rng.randint(5, 12))]
        out.append(phrase * 4 if i % 2 == 0 else [rng.randrange(3, 49000) for _ in range(40)])
    return out


@pytest.fixture(scope="module")
def spec_engine(tiny_llama_dir):
    engine = eager_engine(str(tiny_llama_dir), dtype="float32", random_seed=0, **SPEC)
    yield engine
    engine.shutdown()


def generate(engine, prompts, params):
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    return [o["output_ids"] for o in outs], outs


def test_greedy_identical_alone_and_batched(tiny_engine, spec_engine):
    prompts = copy_prompts(6, seed=3)
    params = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    ref = [tiny_engine.generate(input_ids=p, sampling_params=params)["output_ids"] for p in prompts]
    alone = [spec_engine.generate(input_ids=p, sampling_params=params) for p in prompts]
    assert [o["output_ids"] for o in alone] == ref
    spec_engine.flush_cache()
    batched, outs = generate(spec_engine, prompts, params)
    assert batched == ref
    metas = [o["meta_info"] for o in alone + outs]
    assert sum(m["spec_accept_token_num"] for m in metas) > 0  # drafts were accepted
    assert all(m["spec_verify_ct"] >= 0 and 0 <= m["spec_accept_rate"] <= 1 for m in metas)
    spec_engine.check_pool_integrity()
    tiny_engine.check_pool_integrity()


def test_stops_inside_an_accepted_run(tiny_engine, spec_engine):
    prompts = copy_prompts(4, seed=5)
    base = {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True}
    full = [tiny_engine.generate(input_ids=p, sampling_params=base)["output_ids"] for p in prompts]
    for n in (1, 2, 3, 7, 13):
        params = {**base, "max_new_tokens": n}
        assert generate(spec_engine, prompts, params)[0] == [f[:n] for f in full]
    # a stop token taken from the middle of each output: both paths stop at its first occurrence
    for p, f in zip(prompts, full):
        params = {**base, "stop_token_ids": [f[9]], "ignore_eos": False}
        want = tiny_engine.generate(input_ids=p, sampling_params=params)
        got = spec_engine.generate(input_ids=p, sampling_params=params)
        assert got["output_ids"] == want["output_ids"] == f[: f.index(f[9]) + 1]
        assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
    spec_engine.check_pool_integrity()


def test_sampling_and_fallback_requests_finish(spec_engine):
    """Sampled requests speculate; logprob and penalty requests fall back to decode steps."""
    prompts = copy_prompts(4, seed=7)
    sampled = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 20, "ignore_eos": True}
    outs = spec_engine.generate(input_ids=prompts, sampling_params=sampled)
    assert all(len(o["output_ids"]) == 20 for o in outs)
    lp = spec_engine.generate(
        input_ids=prompts[0], sampling_params={**sampled, "temperature": 0}, return_logprob=True
    )
    assert lp["meta_info"]["spec_verify_ct"] == 0
    assert len(lp["meta_info"]["output_token_logprobs"]) == 20
    spec_engine.check_pool_integrity()


def test_real_model_copy_prompt_identical_with_acceptance(smollm_compiled_engine):
    """SmolLM2-135M (float32): repeating a given paragraph accepts drafts and keeps every token
    (against the compiled non-speculative engine; the speculative one runs eager)."""
    text = (
        "<|im_start|>user\nRepeat this sentence exactly: The quick brown fox jumps over the lazy dog "
        "near the river bank.<|im_end|>\n<|im_start|>assistant\n"
    )
    params = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    smollm_compiled_engine.flush_cache()
    want = smollm_compiled_engine.generate(text, params)["output_ids"]
    with eager_engine(dtype="float32", max_total_tokens=2048, **SPEC) as spec:
        got = spec.generate(text, params)
        spec.check_pool_integrity()
    assert got["output_ids"] == want
    assert got["meta_info"]["spec_accept_token_num"] > 0
