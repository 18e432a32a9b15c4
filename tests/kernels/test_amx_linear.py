"""The AMX tile kernel behind the gemv op's bfloat16 path (research_rt/kernels/csrc/amx_linear.cpp)
against float64 products of the same bfloat16 inputs, and the row independence the engine relies on.

Tolerance: one bfloat16 rounding of the result (2^-8 relative) plus float32 accumulation over K
(1e-3 * sqrt(K) absolute), as for the gemv loop (test_gemv.py). Runs only where the CPU has AMX.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from research_rt.kernels import amx_linear_available, gemv_op

pytestmark = pytest.mark.skipif(not amx_linear_available(), reason="no AMX tiles on this CPU or build")


def amx(x, w, b=None):
    return torch.ops.research_rt.amx_linear(x, w, b)


def exact(x, w, b=None):
    return x.double() @ w.double().t() + (0 if b is None else b.double())


def case(m, k, n, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    return x, w, b


# (M, K, N): SmolLM2-135M's decode shapes at batch 1, 17 and 64; a prefill chunk; the lm_head; a
# last weight block of fewer than 16 rows (N % 16); one K block; M tiles past one 256-row chunk.
SHAPES = [
    (1, 576, 960),
    (17, 576, 3072),
    (64, 1536, 576),
    (300, 576, 576),
    (3, 576, 49152),
    (5, 64, 37),
    (40, 32, 5),
    (600, 96, 20),
]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_product(m, k, n, bias):
    x, w, b = case(m, k, n, m + k + n, bias)
    out = amx(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    torch.testing.assert_close(out.double(), exact(x, w, b), rtol=2**-8, atol=1e-3 * k**0.5)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 70), kb=st.integers(1, 6), n=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_each_row_is_bit_identical_whatever_its_batch(m, kb, n, seed):
    """A row's output does not depend on how many rows share the call or where it sits: a request's
    logits are the same alone and in any decode batch."""
    x, w, b = case(m, 32 * kb, n, seed)
    full = amx(x, w, b)
    i = seed % m
    assert torch.equal(amx(x[i : i + 1], w, b), full[i : i + 1])
    assert torch.equal(amx(x[i:], w, b), full[i:])


def test_gemv_op_takes_the_tile_path_for_bfloat16():
    x, w, b = case(40, 576, 100, 1)
    assert torch.equal(gemv_op()(x, w, b), amx(x, w, b))


def test_non_contiguous_inputs_and_bad_shapes():
    x, w, b = case(20, 64, 48, 2)
    wt = w.t().contiguous().t()  # same values, column-major
    assert torch.equal(amx(x, wt, b), amx(x, w, b))
    with pytest.raises(RuntimeError, match="K % 32"):
        amx(x[:, :40], w[:, :40], b)  # K not a multiple of 32: the gemv op takes its own loop
    with pytest.raises(RuntimeError, match="bias of 48"):
        amx(x, w, b[:5])
