"""The gemv op's bfloat16 kernel on AVX512-BF16 (research_rt/kernels/csrc/panel_linear.cpp): the
weight is packed once and its packed copy must follow the weight. Edited in place (the version
counter), written through `.data` (then `forget_packed_weights`), freed and its memory reused by
another weight: the op always computes with the weight as it is now, bit for bit what a fresh copy
of that weight gives. Rows beyond the 64 of a decode bucket keep batch 1's bits too."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from research_rt.kernels import (
    amx_linear_available,
    decode_attention_vectorized,
    forget_packed_weights,
    gemv_op,
    packed_weight_count,
)

op = gemv_op()
pytestmark = pytest.mark.skipif(
    op is None or amx_linear_available() or not decode_attention_vectorized(torch.bfloat16, 64),
    reason="the panel kernel runs bfloat16 on AVX512-BF16 CPUs without AMX",
)


def fresh(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The op on a new copy of w: packed from scratch."""
    return op(x, w.clone(), None if b is None else b.clone())


def weights(n: int = 96, k: int = 160, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()


def test_a_weight_is_packed_once():
    x, w = weights()
    before = packed_weight_count()
    first = op(x, w, None)
    assert packed_weight_count() == before + 1
    for rows in (1, 3, 4):
        op(x[:rows], w, None)
    assert packed_weight_count() == before + 1
    assert torch.equal(op(x, w, None), first)


def test_in_place_edits_are_followed():
    x, w = weights(seed=1)
    op(x, w, None)
    w.mul_(2)
    assert torch.equal(op(x, w, None), fresh(x, w))
    w[5].zero_()  # through a view: the version counter is shared
    out = op(x, w, None)
    assert torch.equal(out, fresh(x, w)) and not out[:, 5].any()
    w.narrow(1, 0, 3).fill_(1)
    assert torch.equal(op(x, w, None), fresh(x, w))


def test_writes_through_data_are_followed_after_forget():
    x, w = weights(seed=2)
    p = torch.nn.Parameter(w, requires_grad=False)
    op(x, p, None)
    _, other = weights(seed=3)
    p.data.copy_(other)  # no version bump: the loader's way, which calls forget_packed_weights
    forget_packed_weights()
    assert torch.equal(op(x, p, None), fresh(x, other))


def test_a_freed_weight_is_not_mistaken_for_a_new_one():
    """The copy is kept by the weight's data pointer; a new weight in the freed memory (same
    address, same shape, version 0) must be packed anew."""
    x, w = weights(seed=4)
    op(x, w, None)
    address = w.data_ptr()
    del w
    gc.collect()
    reused = False
    for seed in range(5, 25):
        _, w = weights(seed=seed)
        reused |= w.data_ptr() == address
        assert torch.equal(op(x, w, None), fresh(x, w)), seed
    if not reused:
        pytest.skip("the allocator did not hand back the freed address")


@pytest.mark.parametrize("k,n", [(576, 960), (33, 65), (1, 5), (200, 129)])
def test_rows_keep_batch_1_bits_past_64(k, n):
    g = torch.Generator().manual_seed(k + n)
    x = torch.randn(150, k, generator=g).bfloat16()
    w, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    alone = torch.cat([op(x[i : i + 1], w, b) for i in range(150)])
    for lo, hi in ((0, 150), (7, 100), (64, 129)):
        assert torch.equal(op(x[lo:hi], w, b).view(torch.int16), alone[lo:hi].view(torch.int16)), (lo, hi)
    exact = x.double() @ w.double().t() + b.double()
    torch.testing.assert_close(alone.double(), exact, rtol=2**-8, atol=1e-3 * k**0.5)
    torch.testing.assert_close(alone.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2 * k**0.5)
