"""RMSNorm computed in float32 and cast back, exactly as Hugging Face's Llama does.

Eager CPU code (prefill) runs it as the C++ op `research_rt::rms_norm` where it built: the same
computation in one pass over each row instead of ~8 ATen ops (kernels/csrc/rms_norm_silu.cpp).
Compiled graphs keep the PyTorch code below, which Inductor fuses.
"""

from __future__ import annotations

import torch
from torch import nn

from research_rt.kernels import rms_norm_op


def eager_cpu_op(x: torch.Tensor, dtype: torch.dtype, op_getter):
    """The C++ row op for eager inference on a contiguous CPU tensor of `dtype`, else None."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or x.device.type != "cpu":
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
        op = eager_cpu_op(x, self.weight.dtype, rms_norm_op)
        if op is not None:
            return op(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
