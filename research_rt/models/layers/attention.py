"""The attention layer a model calls: it hands q/k/v to the batch's attention backend."""

from __future__ import annotations

import torch
from torch import nn

from research_rt.core.forward_batch import ForwardBatch


class Attention(nn.Module):
    """Writes this layer's k/v into the KV pool and attends over each request's cached tokens."""

    def __init__(
        self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] -> [T, H * D]."""
        return batch.attn_backend.forward(q, k, v, self, batch)
