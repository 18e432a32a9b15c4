"""Mixture-of-experts building blocks: top-k routing and grouped expert dispatch.

`FusedExperts` keeps every expert's gate and up projections fused in one tensor
`w13[E, 2 * I, H]` (gate rows first, then up) and the down projections in `w2[E, H, I]`.
Dispatch is grouped: the (token, choice) pairs are sorted by expert, so each expert runs one
matmul over its contiguous slice; the Python loop is over experts, never over tokens.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts (float32), keep the top k; optionally renormalize them to sum to 1.

    Returns (weights [T, k] float32, expert ids [T, k] int64), as transformers' routers do."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedExperts(nn.Module):
    """E SwiGLU experts with fused gate/up weights."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; topk_* [T, k] -> sum over the k choices of weight * expert(x)."""
        num_tokens, k = topk_ids.shape
        flat_ids = topk_ids.reshape(-1)
        # sort the T*k (token, choice) pairs by expert: each expert's inputs become one slice
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        xs = x[token_of]
        out = torch.empty_like(xs)
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            gate, up = F.linear(xs[start : start + n], self.w13[expert]).chunk(2, dim=-1)
            out[start : start + n] = F.linear(F.silu(gate) * up, self.w2[expert])
            start += n
        out = out * topk_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, out)

    def load_expert_weight(self, expert: int, kind: str, tensor: torch.Tensor) -> None:
        """kind: gate, up or down (one expert's HF tensor) into the fused storage."""
        inter = self.intermediate_size
        dst = {
            "gate": self.w13.data[expert, :inter],
            "up": self.w13.data[expert, inter:],
            "down": self.w2.data[expert],
        }[kind]
        if dst.shape != tensor.shape:
            raise ValueError(
                f"expert {expert} {kind}: checkpoint {tuple(tensor.shape)} vs {tuple(dst.shape)}"
            )
        dst.copy_(tensor)


# HF per-expert tensor names: Qwen2-MoE style (gate_proj/up_proj/down_proj) and Mixtral (w1/w3/w2)
EXPERT_NAME = re.compile(
    r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
EXPERT_KIND = {
    "gate_proj": "gate",
    "w1": "gate",
    "up_proj": "up",
    "w3": "up",
    "down_proj": "down",
    "w2": "down",
}


def parse_expert_name(name: str) -> tuple[str, int, str] | None:
    """`model.layers.0.mlp.experts.3.w1.weight` -> ("model.layers.0.mlp.experts", 3, "gate")."""
    m = EXPERT_NAME.match(name)
    if m is None:
        return None
    return m["prefix"], int(m["expert"]), EXPERT_KIND[m["proj"]]


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ an optional shared expert scaled by a sigmoid gate).

    Module names follow the HF checkpoints (`gate`, `experts`, `shared_expert`,
    `shared_expert_gate`). `forward(x, recorder)` reports the routing to `recorder` when given."""

    def __init__(
        self,
        layer_id: int,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        shared_expert: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert is not None else None

    def forward(self, x: torch.Tensor, recorder=None) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        if recorder is not None:
            recorder.record(self.layer_id, ids)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
