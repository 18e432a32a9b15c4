"""Linear layers that decode fast on CPU under torch.compile.

For one row (single-stream decode), a matrix-vector product is bound by reading the weight
once from memory. oneDNN/MKL GEMV reaches a fraction of the memory bandwidth on small CPUs, while
Inductor turns `(w * x).sum(-1)` into one vectorised loop that streams the weight in its own dtype
and accumulates in float32: about 1.5-2x faster here (benchmarks/bench_single_stream.py). Eager code
and larger batches use `F.linear` (a GEMM that reuses each weight across rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GEMV_MAX_ROWS = 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and torch.compiler.is_compiling():
        out = (weight[:, None, :].float() * x[None, :, :].float()).sum(-1).t()
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward goes through `linear` (same parameters, same checkpoint names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
