"""A weight matrix in the layout of ATen's weight-only int8 / int4 kernels, and how to quantize into it
(why and when: see quant.py)."""

from __future__ import annotations

import torch

from research_rt.core.quant_config import WeightOnlyConfig


class PackedWeight:
    """One weight matrix [N, K] in the layout of the weight-only kernels (see `quantize_weight`)."""

    def __init__(self, bits: int, group_size: int, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        self.bits, self.group_size, self.qweight, self.scales = bits, group_size, qweight, scales

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ W.T [M, N] in x's dtype."""
        if self.bits == 8:
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, self.scales)


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
    blocks = w.view(n, k // gs, gs)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    codes = ((blocks - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    # the kernel computes (code - 8) * scale + zero, with scale and zero in the model dtype
    scale_zero = torch.stack([scale, lo + 8 * scale], -1).to(weight.dtype)  # [N, K/gs, 2]
    packed = PackedWeight(
        4,
        gs,
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.view(n, k), 1),
        scale_zero.transpose(0, 1).contiguous(),
    )
    s, z = scale_zero.float().unbind(-1)
    return packed, ((codes.float() - 8) * s[..., None] + z[..., None]).view(n, k)
