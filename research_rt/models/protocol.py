"""What the runner needs of a decoder model, written down. Every model in this package meets it
(`LlamaForCausalLM` and the classes built on it); a researcher's own model only has to as well.

    forward(input_ids [T], positions [T], batch: ForwardBatch) -> hidden [T, H]
    compute_logits(hidden [N, H]) -> float32 logits [N, V]
    load_weights(iterable of (checkpoint name, tensor)) -> names loaded
    kv_spec() -> KVSpec: what the KV pool stores per token (the runner sizes its pools from it)

Optional: `pool(hidden)` (a score head: served as an embedding model), `moe_layer_ids` and
`num_experts` (expert-distribution recording), `pad_token_id` (trailing pads dropped before scoring).
Encoder models (`is_encoder = True`, e.g. BertModel) run through the encoder runner instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from research_rt.core.forward_batch import ForwardBatch


@dataclass(frozen=True)
class KVSpec:
    """Per token: `num_layers` x (key and value) x `num_kv_heads` x `head_dim` elements."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


@runtime_checkable
class CausalLM(Protocol):
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]: ...

    def kv_spec(self) -> KVSpec: ...
