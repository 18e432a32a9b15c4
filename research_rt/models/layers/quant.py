"""Weight-only quantization for single-row decode (`--torchao-config int8wo | int4wo-<group>`).

Single-stream decode reads every weight once per token, so its speed is the memory bandwidth
divided by the weights' size. Storing the weights in 8 or 4 bits and multiplying with ATen's
weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, the kernels torchao
uses on CPU) reads 2x / 4x fewer bytes than bfloat16.

Those kernels are slower than a bfloat16 GEMM once a batch has more than a few rows (2.5x at 64
rows here), so each quantized linear keeps two forms of ONE set of weights:
- `packed`: the quantized weight in the kernel's layout, used for a single row (batch-1 decode);
- the module's dense `weight`, overwritten with the dequantized values, used for every other shape
  (prefill, batched decode).
Both forms hold the same numbers, so quantizing changes the model once, for all batch shapes;
only summation order differs between the kernels (as it does between GEMV and GEMM anyway).

int4wo-32 on a Q4_0 / Q4_1 GGUF checkpoint (the embedded SmolLM2) reproduces the file's own 4-bit
grid: each block's minimum and maximum are grid points, so requantizing finds the same codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WeightOnlyConfig:
    bits: int  # 8 or 4
    group_size: int  # int4 only; int8 is per output channel

    @staticmethod
    def parse(spec: str | None) -> WeightOnlyConfig | None:
        """`int8wo`, `int4wo-<group>` (SGLang's --torchao-config spelling), or empty for none."""
        if not spec:
            return None
        if spec == "int8wo":
            return WeightOnlyConfig(8, 0)
        if spec.startswith("int4wo-") and spec[7:].isdigit() and int(spec[7:]) in (32, 64, 128, 256):
            return WeightOnlyConfig(4, int(spec[7:]))
        raise ValueError(
            f"torchao_config must be one of '', 'int8wo', 'int4wo-32', 'int4wo-64', 'int4wo-128', "
            f"'int4wo-256', got {spec!r}"
        )


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


def quantize_model(model: nn.Module, config: WeightOnlyConfig) -> int:
    """Quantize every research_rt `Linear` but the LM head, in place; return how many.

    Each gets `packed` (used for single-row inputs) and its dense weight replaced by the
    dequantized values (used for everything else). Calling it again (after a weight update)
    requantizes into the same packed tensors. The LM head (often tied to the embedding) keeps the
    model dtype, as torchao leaves it: on the embedded SmolLM2 its table is Q8_0, and 4-bit codes
    moved prompt log-probs by 0.6 (int8 per channel: 0.16; unquantized: 0.06)."""
    from research_rt.models.layers.linear import Linear

    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear) and name.rsplit(".", 1)[-1] != "lm_head":
                module.packed = _pack_into(module.weight, config, module.packed)
                count += 1
    return count


def _pack_into(weight: nn.Parameter, config: WeightOnlyConfig, existing: PackedWeight | None) -> PackedWeight:
    """Quantize `weight`; refill `existing` in place (after a weight update the compiled step keeps
    reading the same tensors) or return a new PackedWeight."""
    packed, dequantized = quantize_weight(weight.data, config)
    weight.data.copy_(dequantized)
    if existing is None:
        return packed
    existing.qweight.copy_(packed.qweight)
    existing.scales.copy_(packed.scales)
    return existing
