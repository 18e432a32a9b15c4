"""SwiGLU's activation: silu(gate) * up of a fused gate_up projection (gate columns first).

On CPU it runs as the C++ op `research_rt::silu_mul` where it built (one pass, SiLU rounded to the
input's dtype, then the product: kernels/csrc/rms_norm_silu.cpp), in eager code and compiled graphs
alike, so a step has the same bits either way; elsewhere the PyTorch code below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from research_rt.kernels import silu_mul_op
from research_rt.models.layers.norm import cpu_row_op


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [.., 2F] -> silu(gate_up[.., :F]) * gate_up[.., F:]  [.., F]."""
    op = cpu_row_op(gate_up, gate_up.dtype, silu_mul_op)
    if op is not None:
        return op(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
