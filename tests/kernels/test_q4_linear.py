"""`research_rt::q4_linear` (research_rt/kernels/csrc/q4_linear.cpp), the 4-bit weight-only linear of
`--torchao-config int4wo-<group>` on AVX512-BF16: against a pure-PyTorch reading of the packed
layout (which also checks the packing), against the dequantized weights' float32 product, and
against ATen's int4 kernel it replaces, on random and SmolLM2's shapes."""

from __future__ import annotations

import pytest
import torch

from research_rt.core.quant_config import WeightOnlyConfig
from research_rt.kernels import q4_linear_op
from research_rt.models.layers.packed_weight import (
    _OCTET_SHIFTS,
    PANEL_COLS,
    int4_codes,
    pack_q4_panels,
    quantize_weight,
)

op = q4_linear_op()
pytestmark = pytest.mark.skipif(op is None, reason="the int4 kernel runs on AVX512-BF16 CPUs")


def reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int, n: int) -> torch.Tensor:
    """The op in PyTorch, from the packed tensors: unpack, dequantize, multiply in float32."""
    words = codes.transpose(1, 2).reshape(-1, codes.shape[1]).to(torch.int64) & 0xFFFFFFFF  # [P*32, K/8]
    q = (words[..., None] >> _OCTET_SHIFTS) & 0xF  # [P*32, K/8, 8]
    pairs = scales.transpose(1, 2).reshape(-1, scales.shape[1]).contiguous()  # [P*32, K/group]
    sz = pairs.view(torch.bfloat16).view(pairs.shape[0], pairs.shape[1], 2).float()
    w = (q.reshape(q.shape[0], -1).float() - 8).view(q.shape[0], -1, group) * sz[..., :1] + sz[..., 1:]
    return (x.float() @ w.reshape(w.shape[0], -1)[:n].T).to(torch.bfloat16)


def quantized(n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).bfloat16()
    packed, deq = quantize_weight(w, WeightOnlyConfig(4, group))
    return packed, deq


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within one bfloat16 step of the float32 product (the op rounds its float32 sum once)."""
    return bool(((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-2).all())


@pytest.mark.parametrize(
    "n,k,group,rows",
    [(96, 64, 32, 1), (100, 576, 32, 3), (576, 1536, 64, 5), (49, 256, 128, 2), (33, 512, 256, 1)],
)
def test_matches_the_layout_read_in_pytorch_and_the_dequantized_weights(n, k, group, rows):
    packed, deq = quantized(n, k, group)
    assert packed.n == n and packed.qweight.shape == (-(-n // PANEL_COLS), k // 8, PANEL_COLS)
    x = torch.randn(rows, k).bfloat16()
    got = packed.matmul(x)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert close(got, reference(x, packed.qweight, packed.scales, group, n))
    assert close(got, x.float() @ deq.T)


def test_a_row_keeps_its_bits_in_any_batch():
    """Batches of any size (tiles of 2 rows; from 3 rows on over a panel decoded once) give each row
    the bits it gets alone: `--torchao-config int4wo` serves every decode batch and prefill with the
    op, and a request's greedy tokens must not depend on what runs beside it."""
    packed, _ = quantized(3072, 576, 32, seed=1)
    x = torch.randn(37, 576, generator=torch.Generator().manual_seed(2)).bfloat16()
    alone = torch.cat([packed.matmul(x[i : i + 1]) for i in range(len(x))])
    for rows in (2, 3, 4, 5, 16, 37):
        for start in range(0, len(x) - rows + 1, rows):
            assert torch.equal(packed.matmul(x[start : start + rows]), alone[start : start + rows]), rows


def test_smollm2_shapes_agree_with_aten_int4():
    """SmolLM2-135M's projections (K = 576 or 1536, groups of 32): what ATen's int4 kernel computes
    from the same codes and scales, up to its own rounding."""
    for n, k in [(960, 576), (576, 576), (3072, 576), (576, 1536)]:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).bfloat16()
        codes, scale_zero = int4_codes(w, 32, torch.bfloat16)
        x = torch.randn(1, k).bfloat16()
        aten = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x,
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
            32,
            scale_zero.transpose(0, 1).contiguous(),
        )
        got = op(x, *pack_q4_panels(codes, scale_zero), 32, n)
        assert torch.allclose(got.float(), aten.float(), rtol=2e-2, atol=5e-2), (n, k)


def test_packing_puts_each_code_where_the_kernel_reads_it():
    """One code set at a time: the word of its column and octet holds it at its k's nibble."""
    n, k, group = 40, 64, 32
    codes = torch.zeros(n, k, dtype=torch.int32)
    codes[37, 13] = 11  # panel 1, column 5; octet 1, k = 5 -> high half, nibble 2 -> bit 24
    scale_zero = torch.ones(n, k // group, 2).bfloat16()
    words, pairs = pack_q4_panels(codes, scale_zero)
    assert words.shape == (2, k // 8, PANEL_COLS) and pairs.shape == (2, k // group, PANEL_COLS)
    assert words[1, 1, 5].item() == 11 << 24
    assert words.count_nonzero().item() == 1
    assert pairs[1, 0, 8:].eq(0).all() and pairs[0].ne(0).all()  # padded columns: scale and offset 0


def test_bad_layouts_are_refused():
    packed, _ = quantized(64, 64, 32)
    x = torch.randn(1, 64).bfloat16()
    with pytest.raises(RuntimeError, match="codes must be"):
        op(x, packed.qweight[:, :4].contiguous(), packed.scales, 32, 64)
    with pytest.raises(RuntimeError, match="codes must be"):  # n must fill the last panel
        op(x, packed.qweight, packed.scales, 32, 32)
    with pytest.raises(RuntimeError, match="scales must be"):
        op(x, packed.qweight, packed.scales[:, :1].contiguous(), 32, 64)
    with pytest.raises(RuntimeError, match="bfloat16"):
        op(x.float(), packed.qweight, packed.scales, 32, 64)


def test_compiled_graphs_call_the_op():
    """A quantized `Linear` under torch.compile (as the batch-1 decode step runs it): the graph calls
    the op through its fake implementation and gives the eager call's bits (rounding where the
    model casts, as the decode step compiles: `emulate_precision_casts`)."""
    from research_rt.models.layers.linear import Linear
    from research_rt.models.layers.quant import quantize_model

    torch.manual_seed(3)
    model = torch.nn.Sequential(Linear(256, 96), torch.nn.SiLU(), Linear(96, 40, bias=True)).bfloat16()
    assert quantize_model(model, WeightOnlyConfig(4, 32)) == 2
    assert model[0].packed.n == 96
    x = torch.randn(1, 256).bfloat16()
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, options={"emulate_precision_casts": True})(x)
    assert torch.equal(compiled, eager)
