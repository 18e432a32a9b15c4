"""Rotary position embedding (rotate-half / NeoX layout), with every rope scaling transformers knows.

The inverse frequencies come from `transformers.modeling_rope_utils` for scaled variants (llama3,
linear, yarn, ...), so a Llama-3 checkpoint's `rope_scaling` is honoured without re-deriving it.

On CPU, q and k are rotated by the C++ op `research_rt::rotary` where it built: the same roundings
in one pass instead of ~14 ATen ops (kernels/csrc/rotary.cpp), in eager code and compiled graphs
alike (Inductor's fusion of the PyTorch code below keeps the products in float32: other bits).
"""

from __future__ import annotations

import torch
from torch import nn

from research_rt.kernels import rotary_op

_OP_DTYPES = (torch.float32, torch.bfloat16)


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inv_freq_for(config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = _rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        base = float(params["rope_theta"])
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_positions); `forward` rotates q and k in place order."""

    def __init__(self, config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = inv_freq_for(config, head_dim)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)
        self.register_buffer("half_sign", torch.tensor([[-1.0], [1.0]]), persistent=False)  # _rotate_half

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, KVH, D] -> rotated (in q's dtype)."""
        if self._cpu_op_takes(q, k):
            op = rotary_op()
            if op is not None:
                return op(positions, q, k, self.cos, self.sin)
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        sign = self.half_sign.to(q.dtype)
        return q * cos + _rotate_half(q, sign) * sin, k * cos + _rotate_half(k, sign) * sin

    def _cpu_op_takes(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether this is inference on CPU tensors the op takes (else the PyTorch code)."""
        if torch.is_grad_enabled() or q.device.type != "cpu":
            return False
        return q.dtype in _OP_DTYPES and k.dtype == q.dtype and self.cos.dtype == torch.float32


def _rotate_half(x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """cat(-x[.., D/2:], x[.., :D/2]) as a flip of the two halves times sign = [[-1], [1]] (x's
    dtype, on its device): the same values (both exact; NaN payloads aside), but Inductor reads the
    flip as index arithmetic inside the rotary kernel, where the cat's halves were views the step's
    Python wrapper built each call (180 `reinterpret_tensor` calls a SmolLM2 decode step before, 60
    after)."""
    return (x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2) * sign).flatten(-2)
