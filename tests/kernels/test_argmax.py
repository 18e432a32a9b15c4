"""The C++ `research_rt::argmax_rows` op (research_rt/kernels/csrc/argmax.cpp) against torch.argmax:
the same index exactly, ties (first index), NaN (first NaN), infinities and ragged row lengths
included, and the greedy sampler that calls it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from research_rt.kernels import argmax_op
from research_rt.sampling.sampler import greedy_ids

op = argmax_op()
pytestmark = pytest.mark.skipif(op is None, reason="the C++ extension did not build here")


@pytest.mark.parametrize(
    "rows,vocab", [(1, 49152), (64, 49152), (3, 1), (5, 15), (4, 16), (2, 17), (7, 1000)]
)
def test_matches_torch_on_random_logits(rows, vocab):
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows * vocab))
    assert torch.equal(op(x), x.argmax(-1))


def test_ties_nan_and_infinities():
    x = torch.zeros(6, 100)
    x[0, [7, 40, 93]] = 5.0  # tie in three lanes: the first index
    x[1, [3, 19]] = 2.0  # tie in one lane (3 and 19 = 3 + 16)
    x[2, 50], x[2, 10] = float("nan"), float("nan")  # the first NaN
    x[3] = float("-inf")  # all -inf: index 0
    x[4, 99] = float("inf")  # in the scalar tail
    x[5, 98] = float("nan")  # a NaN in the tail only
    assert op(x).tolist() == [7, 3, 10, 0, 99, 98]
    assert torch.equal(op(x), x.argmax(-1))


def test_non_contiguous_rows():
    x = torch.randn(8, 300).t().contiguous().t()[:, :200]  # strided
    assert torch.equal(op(x), x.argmax(-1))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 70),
    st.lists(st.sampled_from([0.0, 1.0, -1.0, 3.5, float("inf"), float("-inf"), float("nan")]), min_size=1),
)
def test_matches_torch_on_few_distinct_values(rows, vocab, values):
    """Few distinct values make ties and NaNs common."""
    pool = torch.tensor(values)
    g = torch.Generator().manual_seed(rows * 100 + vocab)
    x = pool[torch.randint(len(values), (rows, vocab), generator=g)]
    assert torch.equal(op(x), x.argmax(-1))


def test_greedy_ids_uses_torch_for_other_dtypes():
    x = torch.randn(3, 50)
    assert torch.equal(greedy_ids(x), x.argmax(-1))
    assert torch.equal(greedy_ids(x.bfloat16()), x.bfloat16().argmax(-1))
