"""The attention-backend interface: how a model's attention layers read and write the KV pool.

A backend owns three things:
- its metadata (`build_metadata`): whatever tensors it needs to find each request's cached keys,
  built once per step by the model runner and carried in `ForwardBatch.attn_metadata`;
- `forward(q, k, v, layer, batch)`: write this step's k/v into the pool at `batch.out_cache_loc`
  and attend over each request's keys;
- what a compiled or graph-captured decode step needs (`pad_for_graph`, `dynamic_dims`): the
  metadata padded to a fixed batch bucket and key length, padding rows attending only to the
  dummy slot 0, and which dimensions of its tensors change from step to step.

Metadata is a dataclass of tensors (None for fields a mode does not use), so the graph runner can
pass it through `torch.compile` and copy it into static buffers without knowing its fields.
A new backend is one file in this package plus one line in `BACKENDS` (`__init__.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from research_rt.core.forward_batch import ForwardBatch, ForwardMode


class AttentionBackend:
    name: str = ""
    metadata_cls: type = object

    def build_metadata(
        self,
        mode: ForwardMode,
        prefix_lens: list[int],
        extend_lens: list[int],
        kv_rows: torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> Any:
        """Metadata for requests whose KV slots are `kv_rows[b, :prefix_lens[b] + extend_lens[b]]`:
        request b has `prefix_lens[b]` cached tokens and `extend_lens[b]` new ones (1 in DECODE)."""
        raise NotImplementedError

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Any, batch: ForwardBatch
    ) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] -> [T, H * D]."""
        raise NotImplementedError

    def pad_for_graph(self, metadata: Any, bucket: int, kv_len: int) -> Any:
        """DECODE metadata padded to `bucket` requests and `kv_len` keys."""
        raise NotImplementedError

    def dynamic_dims(self) -> dict[str, int]:
        """Metadata field -> the dimension that varies with the key length (marked dynamic)."""
        return {}

    def key_length(self, metadata: Any) -> int:
        """How many keys the longest request of a DECODE batch reads."""
        raise NotImplementedError

    # ---------------------------------------------------------------- generic helpers
    @staticmethod
    def tensors(metadata: Any) -> dict[str, torch.Tensor]:
        """The metadata's tensors by field name (None fields left out)."""
        fields = dataclasses.fields(metadata)
        return {f.name: getattr(metadata, f.name) for f in fields if getattr(metadata, f.name) is not None}

    def from_tensors(self, tensors: dict[str, torch.Tensor]) -> Any:
        return self.metadata_cls(**tensors)
