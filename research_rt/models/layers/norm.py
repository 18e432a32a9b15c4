"""RMSNorm computed in float32 and cast back, exactly as Hugging Face's Llama does.

On CPU it runs as the C++ op `research_rt::rms_norm` where it built: the same computation in one
pass over each row instead of ~8 ATen ops (kernels/csrc/rms_norm_silu.cpp), in eager code and in
compiled graphs alike. Inductor's fusion of the PyTorch code below sums the squares in another order
and keeps bfloat16 intermediates in float32, so a decode step compiled gave other bits than the same
step eager: one of 16 greedy SmolLM2 continuations in bfloat16 changed at its 15th token.
"""

from __future__ import annotations

import torch
from torch import nn

from research_rt.kernels import rms_norm_op


def cpu_row_op(x: torch.Tensor, dtype: torch.dtype, op_getter):
    """The C++ row op for inference (eager or compiled: the same bits either way) on a contiguous
    CPU tensor of `dtype`, else None (autograd, other devices: the PyTorch code)."""
    if torch.is_grad_enabled() or x.device.type != "cpu":
        return None
    if x.dtype != dtype or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous():
        return None
    return op_getter()


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = cpu_row_op(x, self.weight.dtype, rms_norm_op)
        if op is not None:
            return op(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
