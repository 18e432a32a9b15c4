"""Grammar masks in the sampler and matcher bookkeeping, on a 6-token vocabulary (no model)."""

from __future__ import annotations

import pytest
import torch

from research_rt.core.req import Req
from research_rt.core.sampling_params import SamplingParams
from research_rt.sampling.grammar import GrammarState
from research_rt.sampling.sampler import Sampler

xgr = pytest.importorskip("xgrammar")

VOCAB = ["a", "b", "c", "ab", "1", "</s>"]
EOS = 5


@pytest.fixture(scope="module")
def compiler():
    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS])
    return xgr.GrammarCompiler(info, max_threads=1)


def make_req(compiled, seed: int = 0, **sp) -> Req:
    params = SamplingParams(**sp).normalize()
    r = Req(
        rid="r",
        input_ids=[0],
        sampling=params,
        stop_ids=frozenset({EOS}),
        generator=torch.Generator().manual_seed(seed),
    )
    r.grammar = GrammarState(compiled)
    return r


def step(sampler: Sampler, r: Req, logits: torch.Tensor, want_logprobs: bool = False):
    res = sampler(logits[None].clone(), [r], want_logprobs=want_logprobs)
    r.output_ids.append(res.next_ids[0])
    r.check_finished()
    r.grammar.advance(r)
    return res


def test_mask_forces_the_grammar_even_against_greedy(compiler):
    r = make_req(compiler.compile_regex("ab1"), temperature=0.0)
    logits = torch.tensor([0.0, 0.0, 9.0, 0.0, 0.0, 8.0])  # the model wants "c", then EOS
    sampler = Sampler()
    while not r.finished:
        step(sampler, r, logits)
    text = "".join(VOCAB[t] for t in r.output_ids[:-1])
    assert text == "ab1" and r.output_ids[-1] == EOS
    assert r.finished_reason.type == "stop" and r.finished_reason.matched == EOS


@pytest.mark.parametrize("seed", range(10))
def test_sampled_strings_always_match(compiler, seed):
    import re

    r = make_req(compiler.compile_regex("(a|b)+c?1"), seed=seed, temperature=1.0, max_new_tokens=64)
    sampler = Sampler()
    gen = torch.Generator().manual_seed(seed)
    while not r.finished:
        step(sampler, r, torch.randn(len(VOCAB), generator=gen) * 3)
    assert r.finished_reason.type == "stop"
    assert re.fullmatch("(a|b)+c?1", "".join(VOCAB[t] for t in r.output_ids[:-1]))


def test_ignore_eos_still_finishes_when_the_grammar_terminates(compiler):
    r = make_req(compiler.compile_regex("c"), temperature=0.0, ignore_eos=True)
    sampler = Sampler()
    logits = torch.zeros(len(VOCAB))
    step(sampler, r, logits)
    assert not r.finished
    step(sampler, r, logits)  # only EOS is allowed now; ignore_eos does not make the grammar go on
    assert r.output_ids == [2, EOS] and r.finished_reason.type == "stop"


def test_min_new_tokens_yields_when_only_stop_is_allowed(compiler):
    r = make_req(compiler.compile_regex("c"), temperature=1.0, min_new_tokens=5)
    sampler = Sampler()
    logits = torch.zeros(len(VOCAB))
    step(sampler, r, logits)
    res = step(sampler, r, logits, want_logprobs=True)
    assert r.output_ids == [2, EOS] and r.finished
    assert torch.isfinite(res.logprobs).all(), "masked logprobs are clamped, never -inf or NaN"


def test_advance_never_refeeds_accepted_tokens(compiler):
    """A retracted request re-prefills input+output; its matcher must not see old tokens again."""
    r = make_req(compiler.compile_regex("abc1"), temperature=0.0)
    r.output_ids = [0]
    r.grammar.advance(r)
    r.grammar.advance(r)  # e.g. called again after a resume: nothing new to accept
    assert r.grammar.num_accepted == 1 and not r.finished
    r.output_ids += [1, 2]  # two tokens the matcher has not seen (rebuilt state): both fed, in order
    r.grammar.advance(r)
    assert r.grammar.num_accepted == 3 and not r.finished
    bitmask = xgr.allocate_token_bitmask(1, len(VOCAB))
    r.grammar.fill_bitmask(bitmask, 0)
    logits = torch.zeros(1, len(VOCAB))
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [4]  # only "1" may follow "abc"


def test_token_outside_the_grammar_aborts(compiler):
    r = make_req(compiler.compile_regex("ab"), temperature=0.0)
    r.output_ids = [2]  # "c": e.g. forced by a logit processor
    r.grammar.advance(r)
    assert r.finished_reason.type == "abort" and "does not match" in r.finished_reason.message


def test_unconstrained_rows_untouched_in_a_mixed_batch(compiler):
    a = make_req(compiler.compile_regex("b"), temperature=0.0)
    free = Req(rid="f", input_ids=[0], sampling=SamplingParams(temperature=0.0).normalize())
    logits = torch.tensor([[5.0, 0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0, 0]])
    res = Sampler()(logits.clone(), [a, free], want_logprobs=True)
    assert res.next_ids == [1, 0]
    assert torch.allclose(res.logprobs[1], torch.log_softmax(logits[1], -1))
