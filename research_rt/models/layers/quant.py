"""Weight-only quantization (`--torchao-config int8wo | int4wo-<group>`).

Single-stream decode reads every weight once per token, so its speed is the memory bandwidth
divided by the weights' size. Storing the weights in 8 or 4 bits and multiplying with ATen's
weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, the kernels torchao
uses on CPU) reads 2x / 4x fewer bytes than bfloat16. ATen's int4 kernel was compute-bound at 2
threads here, so 4 bits with bfloat16 rows on AVX512-BF16 run the C++ op `research_rt::q4_linear`
(kernels/csrc/q4_linear.cpp, its own layout): SmolLM2-135M's 120 layer linears in 2.9 ms for one
row against 7.1-8.4 ms in bfloat16 (panel kernel), single stream 130 against 80-89 tok/s
(benchmarks/RESULTS.md).

Each quantized linear keeps two forms of ONE set of weights:
- `packed`: the quantized weight in the kernel's layout. `q4_linear` and ATen's int8 kernel serve
  every row count (decode batches, speculative verifies, prefill) and give a row the same bits in
  any batch, so int4wo / int8wo greedy tokens do not depend on batching or cache hits
  (tests/engine/test_invariance.py). From 16 rows on `q4_linear` takes 1.1-1.25x the bfloat16 panel
  kernel's time (per group it also combines scale and offset), ATen's int8 kernel 1.6-2x (an Intel
  Xeon of family 6 model 207, 2 threads, 2026-12-07). ATen's int4 kernel (CPUs without
  AVX512-BF16) serves single rows only (2.5x a bfloat16 GEMM at 64 rows), so there a row's bits
  depend on its batch's size;
- the module's dense `weight`, overwritten with the dequantized values, for the shapes `packed`
  does not serve.
Both forms hold the same numbers, so quantizing changes the model once, for all batch shapes;
only summation order differs between the kernels.

int4wo-32 on a Q4_0 / Q4_1 GGUF checkpoint (the embedded SmolLM2) reproduces the file's own 4-bit
grid: each block's minimum and maximum are grid points, so requantizing finds the same codes.
"""

from __future__ import annotations

import torch
from torch import nn

from research_rt.core.quant_config import WeightOnlyConfig
from research_rt.models.layers.linear import Linear, pack_linear_weights
from research_rt.models.layers.packed_weight import PackedWeight, quantize_weight


def quantize_model(model: nn.Module, config: WeightOnlyConfig) -> int:
    """Quantize every research_rt `Linear` but the LM head, in place; return how many.

    Each gets `packed` (see the module docstring for the rows it serves) and its dense weight replaced by the
    dequantized values (used for everything else). Calling it again (after a weight update)
    requantizes into the same packed tensors. The LM head (often tied to the embedding) keeps the
    model dtype, as torchao leaves it: on the embedded SmolLM2 its table is Q8_0, and 4-bit codes
    moved prompt log-probs by 0.6 (int8 per channel: 0.16; unquantized: 0.06)."""
    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear) and name.rsplit(".", 1)[-1] != "lm_head":
                module.packed = _pack_into(module.weight, config, module.packed)
                count += 1
    pack_linear_weights(model)  # the dense weights changed: the gemv op's packed copies follow now
    return count


def _pack_into(weight: nn.Parameter, config: WeightOnlyConfig, existing: PackedWeight | None) -> PackedWeight:
    """Quantize `weight`; refill `existing` in place (after a weight update the compiled step keeps
    reading the same tensors) or return a new PackedWeight."""
    packed, dequantized = quantize_weight(weight.detach(), config)
    # in place on the parameter, not through `.data`: its version counter tells the gemv op that its
    # packed copy (made at load) is stale; batches and prefill then multiply by the dequantized values
    weight.copy_(dequantized)
    if existing is None:
        return packed
    existing.qweight.copy_(packed.qweight)
    existing.scales.copy_(packed.scales)
    return existing
