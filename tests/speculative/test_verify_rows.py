"""The verify forward runs a request's last token and its drafts as rows of the compiled decode
step (speculative/verify.py). That step computes every row as batch 1 does, bit for bit, so in the
default configuration (compile on) speculative greedy output is normal greedy output, in bfloat16
too. (Without the radix cache: a bfloat16 cache hit recomputes one token differently, a separate
matter noted in benchmarks/RESULTS.md.)"""

from __future__ import annotations

import pytest
import torch

from research_rt.core.forward_batch import ForwardMode
from tests.conftest import compiled_engine
from tests.speculative.test_speculative_engine import SPEC, copy_prompts

PARAMS = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    """Compiled bfloat16 engines on the tiny Llama: (normal decoding, n-gram speculation)."""
    common = {"dtype": "bfloat16", "disable_radix_cache": True, "random_seed": 0}
    with compiled_engine(str(tiny_llama_dir), **common) as plain:
        with compiled_engine(str(tiny_llama_dir), **common, **SPEC) as spec:
            assert plain.compiled_decode() == spec.compiled_decode() == ["1", "2+"]
            yield plain, spec


def test_compiled_decode_rows_match_batch_one(engines):
    """The same token at the same position of one request, as 1 to 9 rows of a decode batch: every
    row's logits equal batch 1's exactly (batch 1 and batch 2+ are different compiled graphs)."""
    runner = engines[1].runner
    table = runner.req_to_token.table
    with torch.inference_mode():
        table[0, :100] = torch.arange(1, 101)
        gen = torch.Generator().manual_seed(0)
        for buf in runner.kv_pool.k_buffers + runner.kv_pool.v_buffers:
            buf[1:101] = torch.randn(buf[1:101].shape, generator=gen).to(buf.dtype)
        logits = {}
        for rows in (1, 2, 5, 9):
            loc = table[torch.zeros(rows, dtype=torch.long), torch.full((rows,), 60)]
            batch = runner.make_rows_batch(
                ForwardMode.DECODE, [0] * rows, [60] * rows, [1] * rows, [777] * rows, loc
            )
            assert runner.runs_compiled(batch)
            logits[rows] = runner.forward(batch, torch.arange(rows))[0]
        table[0, :100] = 0
    for rows, out in logits.items():
        assert all(torch.equal(out[i], logits[1][0]) for i in range(rows)), rows


def test_bfloat16_speculation_is_greedy_decoding(engines, monkeypatch):
    """Drafts that are the true continuation are all accepted, drafts with a wrong token are cut
    there, and every output equals normal decoding (alone and as a batch of verify rows). A random
    model seldom repeats itself, so the drafts come from its own greedy output, not the n-grams."""
    plain, spec = engines
    prompts = copy_prompts(6, seed=3)
    want = [plain.generate(input_ids=p, sampling_params=PARAMS)["output_ids"] for p in prompts]
    future = {tuple(p): w for p, w in zip(prompts, want)}

    def oracle(req):  # the true next 4 tokens; odd prompts get their third one wrong
        draft = list(future[tuple(req.input_ids)][len(req.output_ids) :][:4])
        if prompts.index(list(req.input_ids)) % 2 and len(draft) > 2:
            draft[2] += 1
        return draft

    monkeypatch.setattr(spec.scheduler.speculative, "_draft", oracle)
    alone = [spec.generate(input_ids=p, sampling_params=PARAMS) for p in prompts]
    assert [o["output_ids"] for o in alone] == want
    metas = [o["meta_info"] for o in alone]
    # a verify of 4 right drafts emits 5 tokens: 40 tokens take 8 verifies
    assert [m["spec_verify_ct"] for m in metas[::2]] == [8, 8, 8]
    assert all(m["spec_accept_token_num"] == 2 * m["spec_verify_ct"] for m in metas[1::2])
    batched = spec.generate(input_ids=prompts, sampling_params=PARAMS)  # rows of 6 requests at once
    assert [o["output_ids"] for o in batched] == want
    plain.check_pool_integrity()
    spec.check_pool_integrity()
