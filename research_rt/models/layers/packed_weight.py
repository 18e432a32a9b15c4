"""A weight matrix in the layout of ATen's weight-only int8 / int4 kernels, and how to quantize into it
(why and when: see quant.py)."""

from __future__ import annotations

import torch

from research_rt.core.quant_config import WeightOnlyConfig
from research_rt.kernels import q4_linear_op

PANEL_COLS = 32  # output columns per panel of `research_rt::q4_linear` (csrc/q4_linear.cpp)
# where each of a word's 8 codes goes: k = 0, 2, 4, 6 in the low half's nibbles, 1, 3, 5, 7 in the high
_OCTET_SHIFTS = torch.tensor([0, 16, 4, 20, 8, 24, 12, 28], dtype=torch.int64)


class PackedWeight:
    """One weight matrix [N, K] in the layout of the weight-only kernels (see `quantize_weight`):
    ATen's, or for 4 bits with bfloat16 rows on AVX512-BF16 `research_rt::q4_linear`'s (`n` set)."""

    def __init__(
        self, bits: int, group_size: int, qweight: torch.Tensor, scales: torch.Tensor, n: int | None = None
    ) -> None:
        self.bits, self.group_size, self.qweight, self.scales, self.n = bits, group_size, qweight, scales, n

    @property
    def any_rows(self) -> bool:
        """Whether `matmul` serves every row count, giving a row the same bits in any batch:
        `q4_linear` (1.1-1.25x the bfloat16 panel kernel's time from 16 rows on) and ATen's int8
        kernel (1.6-2x at 64-512 rows, Intel Xeon, 2026-12-07; tests/engine/test_invariance.py checks
        its rows). ATen's int4 kernel, where `q4_linear` does not run, serves single rows only (2.5x
        bfloat16's time at 64 rows)."""
        return self.n is not None or self.bits == 8

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ W.T [M, N] in x's dtype."""
        if self.bits == 8:
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        if self.n is not None:
            return torch.ops.research_rt.q4_linear(x, self.qweight, self.scales, self.group_size, self.n)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, self.scales)


def pack_q4_panels(codes: torch.Tensor, scale_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`research_rt::q4_linear`'s layout (csrc/q4_linear.cpp) of codes [N, K] (0..15) and
    scale_zero [N, K / group, 2] bfloat16: codes [P, K / 8, 32] int32, one word per column and 8
    consecutive k, and scales [P, K / group, 32] int32 (scale in the low 16 bits, offset in the high),
    columns padded with zeros to P panels of 32."""
    n, k = codes.shape
    pad = -n % PANEL_COLS
    words = (codes.to(torch.int64).view(n, k // 8, 8) << _OCTET_SHIFTS).sum(-1).to(torch.int32)
    pairs = scale_zero.contiguous().view(torch.int32).squeeze(-1)  # little-endian: scale low, offset high

    def panels(t: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.pad(t, (0, 0, 0, pad))
        return t.view(-1, PANEL_COLS, t.shape[1]).transpose(1, 2).contiguous()

    return panels(words), panels(pairs)


def quantize_weight(weight: torch.Tensor, config: WeightOnlyConfig) -> tuple[PackedWeight, torch.Tensor]:
    """Quantize a [N, K] weight: the packed form, and the dequantized weight (float32) that the
    kernel multiplies by (up to float rounding)."""
    if weight.dtype not in (torch.bfloat16, torch.float16) or weight.device.type != "cpu":
        raise ValueError("weight-only quantization needs a bfloat16/float16 model on CPU")
    w = weight.detach().float()
    n, k = w.shape
    if config.bits == 8:
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
        codes = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
        stored = scale.to(weight.dtype)
        return PackedWeight(8, 0, codes, stored), codes.float() * stored.float()[:, None]
    gs = config.group_size
    if k % gs:
        raise ValueError(f"int4wo-{gs} needs in_features divisible by {gs}, got {k}")
    codes, scale_zero = int4_codes(w, gs, weight.dtype)
    s, z = scale_zero.float().unbind(-1)
    dequantized = ((codes.view(n, k // gs, gs).float() - 8) * s[..., None] + z[..., None]).view(n, k)
    if weight.dtype == torch.bfloat16 and gs % 8 == 0 and q4_linear_op() is not None:
        return PackedWeight(4, gs, *pack_q4_panels(codes, scale_zero), n=n), dequantized
    packed = PackedWeight(
        4,
        gs,
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
        scale_zero.transpose(0, 1).contiguous(),
    )
    return packed, dequantized


def int4_codes(w: torch.Tensor, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] as 4-bit codes [N, K] (int32, 0..15) and scale_zero [N, K / group, 2] in `dtype`: each
    group's minimum and maximum are grid points; the kernels compute (code - 8) * scale + zero."""
    n, k = w.shape
    blocks = w.float().view(n, k // group, group)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    codes = ((blocks - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    return codes.view(n, k), torch.stack([scale, lo + 8 * scale], -1).to(dtype)
