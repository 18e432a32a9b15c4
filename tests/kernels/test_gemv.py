"""The C++ `research_rt::gemv` op (research_rt/kernels/csrc/gemv.cpp) against F.linear, and the
compiled linear that calls it.

Tolerances: float32 within 1e-5 relative / 1e-4 absolute of F.linear (both accumulate in float32,
in a different order); bfloat16 within one bfloat16 rounding (2^-8 relative) of the float64 product
of the same bfloat16 inputs (the op accumulates in float32 and rounds once at the end).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from research_rt.kernels import amx_linear_available, decode_attention_vectorized, gemv_op
from research_rt.models.layers.linear import linear

op = gemv_op()
pytestmark = pytest.mark.skipif(op is None, reason="the C++ extension did not build here")

# (K, N): SmolLM2-135M's qkv, gate_up and down projections, and ragged sizes that exercise the
# masked tails of the 32- and 64-wide inner loops and thread ranges shorter than one grain
SHAPES = [(576, 960), (576, 3072), (1536, 576), (100, 37), (33, 65), (1, 5), (64, 1), (200, 129)]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 17])  # one pass, two passes, oneDNN past 16
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_matches_linear(k, n, rows, with_bias):
    g = torch.Generator().manual_seed(k * 1000 + n)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if with_bias else None
    torch.testing.assert_close(op(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("rows", [1, 17, 19, 64])  # the row loop; 4 x 4 tiles (AVX512-BF16), with tails
@pytest.mark.parametrize("with_bias", [False, True])
def test_bfloat16_rounds_once(k, n, rows, with_bias):
    g = torch.Generator().manual_seed(k + n)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if with_bias else None
    out = op(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    exact = x.double() @ w.double().t() + (0 if b is None else b.double())
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-3 * k**0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (33, 65)])
def test_each_row_is_bit_identical_at_any_row_count(dtype, k, n):
    """Rows share a pass over the weight but keep their own order of products and sums, so a
    decode batch (or a speculative verify) gives each request what batch 1 gives it."""
    g = torch.Generator().manual_seed(k + 7 * n)
    x = torch.randn(16, k, generator=g).to(dtype)
    w, b = torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    alone = torch.cat([op(x[i : i + 1], w, b) for i in range(16)])
    for rows in (2, 5, 8, 9, 16):
        assert torch.equal(op(x[:rows], w, b), alone[:rows]), rows


@pytest.mark.skipif(
    op is None or not (amx_linear_available() or decode_attention_vectorized(torch.bfloat16, 64)),
    reason="no AVX512-BF16 or AMX here: such rows go to oneDNN, which promises no row invariance",
)
@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (33, 65), (100, 37)])
def test_bfloat16_batch_rows_are_bit_identical_to_batch_1_up_to_64_rows(k, n):
    """Decode batches of 17-64 requests (AMX tiles, or outer products over packed weight panels on
    AVX512-BF16, each output one chain over K): each row has the bits batch 1 gives it, wherever it sits."""
    g = torch.Generator().manual_seed(k + 3 * n)
    x = torch.randn(64, k, generator=g).bfloat16()
    w, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    for bias in (b, None):
        alone = torch.cat([op(x[i : i + 1], w, bias) for i in range(64)])
        for lo, hi in ((0, 17), (3, 22), (30, 63), (0, 64)):
            got = op(x[lo:hi], w, bias)
            assert torch.equal(got.view(torch.int16), alone[lo:hi].view(torch.int16)), (lo, hi, bias is None)


def test_non_contiguous_weight():
    w = torch.randn(48, 80).t()  # [80, 48] view with strides (1, 80)
    x = torch.randn(1, 48)
    torch.testing.assert_close(op(x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_rejects_mismatched_inputs():
    with pytest.raises(RuntimeError, match="one dtype"):
        op(torch.randn(1, 8), torch.randn(4, 8).bfloat16(), None)
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and w \[N, K\]"):
        op(torch.randn(1, 8), torch.randn(4, 9), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_linear_calls_the_op(dtype):
    """Under torch.compile decode rows go through the op (the graph holds it) and give what the op
    gives eagerly, at batch 1 and in a graph with a dynamic batch size."""
    seen: list[str] = []

    def recording_backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    w, b = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype)
    f = torch.compile(lambda x: linear(x, w, b), backend=recording_backend, fullgraph=True, dynamic=False)
    x = torch.randn(1, 64).to(dtype)
    assert torch.equal(f(x), op(x, w, b))
    assert any("research_rt.gemv" in t for t in seen), seen
    seen.clear()
    g = torch.compile(lambda x: linear(x, w, b), backend=recording_backend, fullgraph=True, dynamic=True)
    for rows in (2, 5, 40):
        x = torch.randn(rows, 64).to(dtype)
        assert torch.equal(g(x), op(x, w, b))
    assert any("research_rt.gemv" in t for t in seen), seen
    torch.testing.assert_close(g(x).float(), F.linear(x, w, b).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(
    op is None or not (amx_linear_available() or decode_attention_vectorized(torch.bfloat16, 64)),
    reason="no AVX512-BF16 or AMX here: such rows go to oneDNN, which promises no row invariance",
)
def test_eager_linears_keep_batch_1_bits():
    """Eager CPU linears (decode steps while the compiled step builds, and prefill) take the op and
    compute each row as the compiled step does, the same at any row count, prefill chunks of hundreds
    of rows included (AMX tiles, or the panels on AVX512-BF16). Past 128 rows AMX CPUs took oneDNN
    until 2026-12-08: other bits, and other greedy tokens for prompts prefilled together."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 1536, generator=g).bfloat16()
    w = torch.randn(576, 1536, generator=g).bfloat16()  # SmolLM2's down_proj
    alone = torch.cat([linear(x[i : i + 1], w) for i in range(300)])
    counts = (2, 5, 16, 17, 40, 64, 128, 129, 241, 300)
    for rows in counts:
        assert torch.equal(linear(x[:rows], w).view(torch.int16), alone[:rows].view(torch.int16)), rows
    assert torch.equal(alone, torch.cat([op(x[i : i + 1], w, None) for i in range(300)]))


@pytest.mark.skipif(op is None or not amx_linear_available(), reason="no AMX tiles here")
@pytest.mark.parametrize("k,n", [(576, 3072), (1536, 576), (320, 64), (96, 48), (320, 100)])
def test_amx_prefill_rows_keep_batch_1_bits(k, n):
    """From 128 rows the AMX kernel runs a cache-blocked GEMM with row-major C (C blocks of 256 x 256,
    K panels of 256 values, the weight packed per call; kernels/csrc/amx_linear.cpp) and sends the
    rows past the last whole tile of 16, and weights whose N is no multiple of 32, through the decode
    loop: every row keeps batch 1's bits, wherever the blocks and panels cut, and is near the exact
    product."""
    amx = torch.ops.research_rt.amx_linear
    g = torch.Generator().manual_seed(k * 7 + n)
    x = torch.randn(529, k, generator=g).bfloat16()
    w, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    for bias in (b, None):
        alone = torch.cat([amx(x[i : i + 1], w, bias) for i in range(529)])
        for rows in (64, 127, 128, 144, 255, 256, 257, 300, 529):
            got = amx(x[:rows], w, bias)
            assert torch.equal(got.view(torch.int16), alone[:rows].view(torch.int16)), (rows, bias is None)
    exact = x.double() @ w.double().t()
    torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=1e-3 * k**0.5)


def test_switch_off_gives_no_op(monkeypatch):
    monkeypatch.setenv("RESEARCH_RT_CPU_KERNELS", "0")
    assert gemv_op() is None
