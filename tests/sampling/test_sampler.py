"""Sampler: greedy, top-k / top-p / min-p statistics, seeds, penalties, min_new_tokens."""

from __future__ import annotations

import math

import pytest
import torch

from research_rt.core.req import Req
from research_rt.core.sampling_params import SamplingParams
from research_rt.sampling.sampler import Sampler, apply_penalties, filter_probs

V = 8


def req(rid="r", input_ids=(0,), output_ids=(), seed=None, stop_ids=frozenset(), **sp) -> Req:
    params = SamplingParams(**sp).normalize()
    gen = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator().manual_seed(0)
    r = Req(rid=rid, input_ids=list(input_ids), sampling=params, stop_ids=frozenset(stop_ids), generator=gen)
    r.output_ids = list(output_ids)
    return r


PROBS = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02])
LOGITS = PROBS.log()


def draw(n: int, seed: int = 0, logits: torch.Tensor = LOGITS, **sp) -> torch.Tensor:
    """Sample n tokens one at a time for one request (its generator advances)."""
    r = req(seed=seed, **sp)
    sampler = Sampler()
    out = [sampler(logits[None].clone(), [r], want_logprobs=False).next_ids[0] for _ in range(n)]
    return torch.bincount(torch.tensor(out), minlength=V)


def check_freq(counts: torch.Tensor, allowed: list[int], n: int) -> None:
    expect = torch.zeros(V)
    expect[allowed] = PROBS[allowed] / PROBS[allowed].sum()
    for t in range(V):
        if t not in allowed:
            assert counts[t] == 0, f"token {t} is outside the filter but was sampled"
        else:
            p = float(expect[t])
            tol = 5 * math.sqrt(p * (1 - p) / n) + 1e-9  # 5 sigma
            assert abs(counts[t] / n - p) < tol, (t, counts[t] / n, p)


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    reqs = [req(rid=str(i), temperature=0.0) for i in range(6)]
    assert all(r.sampling.is_greedy for r in reqs)
    res = Sampler()(logits.clone(), reqs, want_logprobs=True)
    assert res.next_ids == logits.argmax(-1).tolist()
    assert res.logprobs is not None
    assert torch.allclose(res.logprobs, torch.log_softmax(logits, -1), atol=1e-5)


def test_plain_sampling_frequencies():
    n = 4000
    check_freq(draw(n, seed=1), list(range(V)), n)


def test_top_k_statistics():
    n = 4000
    check_freq(draw(n, seed=2, top_k=3), [0, 1, 2], n)


def test_top_p_statistics():
    # cumulative before each token: 0, .30, .50, .65, .77 -> top_p .6 keeps tokens 0..2
    n = 4000
    check_freq(draw(n, seed=3, top_p=0.6), [0, 1, 2], n)


def test_min_p_statistics():
    # min_p .35 x max .30 = .105 -> keeps tokens with p >= .105: 0..3
    n = 4000
    check_freq(draw(n, seed=4, min_p=0.35), [0, 1, 2, 3], n)


def test_temperature_sharpens():
    n = 3000
    counts = draw(n, seed=5, temperature=0.5)
    sharp = PROBS**2 / (PROBS**2).sum()
    for t in range(V):
        p = float(sharp[t])
        assert abs(counts[t] / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_filter_probs_direct():
    probs = PROBS[None].repeat(3, 1)
    out = filter_probs(
        probs,
        torch.tensor([2, 1 << 30, 1 << 30]),
        torch.tensor([1.0, 0.6, 1.0]),
        torch.tensor([0.0, 0.0, 0.35]),
    )
    assert torch.allclose(out.sum(-1), torch.ones(3))
    assert (out[0, 2:] == 0).all() and torch.allclose(out[0, :2], PROBS[:2] / PROBS[:2].sum())
    assert (out[1, 3:] == 0).all() and torch.allclose(out[1, :3], PROBS[:3] / PROBS[:3].sum())
    assert (out[2, 4:] == 0).all() and torch.allclose(out[2, :4], PROBS[:4] / PROBS[:4].sum())
    # tiny top_p still keeps the most likely token; order of the input does not matter
    perm = torch.randperm(V)
    out = filter_probs(PROBS[perm][None], torch.tensor([1 << 30]), torch.tensor([1e-6]), torch.tensor([0.0]))
    assert out[0].argmax() == int((perm == 0).nonzero()) and out[0].max() == 1.0


def test_seed_reproducible_and_batch_independent():
    torch.manual_seed(0)
    logits = torch.randn(20, 3, 30)  # 20 steps, up to 3 requests
    sampler = Sampler()

    def run(with_others: bool, seed: int) -> list[int]:
        me = req(rid="me", seed=seed, top_p=0.9)
        others = [req(rid="a", seed=99, top_k=5), req(rid="b", temperature=0.0)]
        out = []
        for step in range(20):
            if with_others:
                batch = [others[0], me, others[1]]
                res = sampler(logits[step].clone(), batch, want_logprobs=False)
                out.append(res.next_ids[1])
            else:
                res = sampler(logits[step, 1:2].clone(), [me], want_logprobs=False)
                out.append(res.next_ids[0])
        return out

    alone = run(False, 1234)
    assert run(False, 1234) == alone
    assert run(True, 1234) == alone
    assert run(False, 4321) != alone  # the seed matters


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    r = req(input_ids=[0, 1], output_ids=[2, 2], repetition_penalty=2.0)
    out = apply_penalties(logits.clone(), [r])
    expect = logits.clone()
    expect[0, 0] = 1.0  # positive seen: divided
    expect[0, 1] = -4.0  # negative seen: multiplied
    expect[0, 2] = 0.5  # seen in output
    assert torch.allclose(out, expect)


def test_frequency_and_presence_penalty():
    logits = torch.zeros(2, 6)
    a = req(rid="a", input_ids=[4, 4, 4], output_ids=[1, 1, 1, 3], frequency_penalty=0.5)
    b = req(rid="b", input_ids=[4], output_ids=[1, 1, 1, 3], presence_penalty=0.7)
    out = apply_penalties(logits.clone(), [a, b])
    exp_a = torch.tensor([0.0, -1.5, 0.0, -0.5, 0.0, 0.0])  # prompt tokens are not counted
    exp_b = torch.tensor([0.0, -0.7, 0.0, -0.7, 0.0, 0.0])
    assert torch.allclose(out[0], exp_a)
    assert torch.allclose(out[1], exp_b)


def test_no_penalty_leaves_logits_unchanged():
    logits = torch.randn(2, 6)
    reqs = [req(rid="a", output_ids=[1, 2]), req(rid="b", output_ids=[3])]
    assert torch.equal(apply_penalties(logits.clone(), reqs), logits)


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    r = req(output_ids=[0, 0], temperature=0.0, frequency_penalty=1.0)
    assert Sampler()(logits.clone(), [r], want_logprobs=False).next_ids == [1]


@pytest.mark.parametrize("use_eos", [True, False])
def test_min_new_tokens_masks_stop_ids(use_eos):
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 0.5]])
    kw = dict(stop_ids={2}) if use_eos else dict(stop_token_ids=[2])
    r = req(temperature=0.0, min_new_tokens=2, output_ids=[1], **kw)
    assert Sampler()(logits.clone(), [r], want_logprobs=False).next_ids == [3]
    r.output_ids = [1, 1]  # min_new_tokens reached: the stop id is allowed again
    assert Sampler()(logits.clone(), [r], want_logprobs=False).next_ids == [2]


def test_min_new_tokens_masks_in_sampling_too():
    logits = torch.tensor([[0.0, 5.0, 5.0, -1.0]])
    r = req(seed=7, min_new_tokens=5, stop_ids={1}, stop_token_ids=[2])
    sampler = Sampler()
    got = {sampler(logits.clone(), [r], want_logprobs=False).next_ids[0] for _ in range(200)}
    assert got <= {0, 3} and 0 in got


def test_logit_processor_applied():
    logits = torch.zeros(1, 5)

    def proc(row, r):
        row = row.clone()
        row[4] = 10.0
        return row

    r = req(temperature=0.0)
    r.logit_processor = proc
    assert Sampler()(logits.clone(), [r], want_logprobs=False).next_ids == [4]
