"""Tensor-parallel sharding by name: the per-rank config, the checkpoint tensors' shards, and the
parallel layers swapped into a built model (the idea of transformers' `base_model_tp_plan`).

A rank builds the unchanged model class from `rank_config` (heads, KV heads, intermediate sizes and
vocabulary divided by the tp size; `head_dim` pinned), so each module is already its shard's
shape; `TPPlan.shard` then cuts each checkpoint tensor as it streams in, by its HF name, before the
model's own `load_weights` (fusions included) sees it. Fused q/k/v and gate/up stay aligned
because their parts are cut separately before fusion. KV heads are split when the tp size divides
them, else each rank keeps the one KV head its query heads use (replicated).

MoE: each expert's matrices are sharded (intermediate dimension), not experts split across
ranks. Every rank then routes identically and does 1/N of every chosen expert's work whatever the
routing skew, the reduction is the same all-reduce as a dense MLP, and no all-to-all is needed;
with few large experts (Mixtral: 8) expert splitting would leave ranks idle when routing is skewed.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from research_rt.distributed.group import TPInfo
from research_rt.distributed.layers import (
    RowParallelExperts,
    RowParallelLinear,
    VocabParallelEmbedding,
    as_parallel,
    gathered_logits,
)
from research_rt.models.layers.linear import Linear
from research_rt.models.layers.moe import FusedExperts

# checkpoint name -> how its tensor is cut (anything else is replicated)
SHARD_RULES = (
    (re.compile(r"\.q_proj\.(weight|bias)$"), "rows"),
    (re.compile(r"\.[kv]_proj\.(weight|bias)$"), "kv_rows"),
    (re.compile(r"\.(gate_proj|up_proj|w1|w3)\.weight$"), "rows"),
    (re.compile(r"\.(o_proj|down_proj|w2)\.weight$"), "cols"),
    (re.compile(r"\.(o_proj|down_proj)\.bias$"), "rank0"),
    (re.compile(r"(^|\.)(embed_tokens|lm_head)\.weight$"), "vocab"),
)
DIVIDED_SIZES = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")


def padded_vocab(vocab_size: int, size: int) -> int:
    return -(-vocab_size // size) * size


class TPPlan:
    """How rank `tp.rank` of `tp.size` holds a model of the full `config`."""

    def __init__(self, config: Any, tp: TPInfo) -> None:
        self.config, self.tp = config, tp
        heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if heads % tp.size:
            raise ValueError(f"--tp-size {tp.size} must divide the {heads} attention heads")
        if self.kv_heads % tp.size and tp.size % self.kv_heads:
            raise ValueError(
                f"--tp-size {tp.size} and the {self.kv_heads} KV heads: one must divide the other"
            )
        for name in DIVIDED_SIZES:
            if getattr(config, name, 0) % tp.size:
                raise ValueError(f"--tp-size {tp.size} must divide {name} ({getattr(config, name)})")
        self.vocab_size = config.vocab_size
        self.vocab_shard = padded_vocab(config.vocab_size, tp.size) // tp.size

    def rank_config(self) -> Any:
        """The config this rank builds its (unchanged) model class from."""
        cfg = copy.deepcopy(self.config)
        size = self.tp.size
        cfg.num_attention_heads = self.config.num_attention_heads // size
        cfg.num_key_value_heads = max(1, self.kv_heads // size)
        cfg.head_dim = self.head_dim
        for name in DIVIDED_SIZES:
            if getattr(cfg, name, None):
                setattr(cfg, name, getattr(cfg, name) // size)
        cfg.vocab_size = self.vocab_shard
        return cfg

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Swap in the parallel layers by name; the full logits are gathered from the slices."""
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("o_proj", "down_proj") and isinstance(module, Linear):
                as_parallel(module, RowParallelLinear)
            elif isinstance(module, FusedExperts):
                as_parallel(module, RowParallelExperts)
            elif leaf == "embed_tokens" and isinstance(module, nn.Embedding):
                as_parallel(module, VocabParallelEmbedding, vocab_start=self.tp.rank * self.vocab_shard)
        model.compute_logits = gathered_logits(model.compute_logits, self.vocab_size)
        return model

    def shard(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each checkpoint tensor cut to this rank's shard, as it streams in."""
        for name, tensor in weights:
            yield name, self.shard_tensor(name, tensor)

    def shard_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        kind = next((k for pattern, k in SHARD_RULES if pattern.search(name)), None)
        rank, size = self.tp.rank, self.tp.size
        if kind == "rows":
            return tensor.chunk(size, dim=0)[rank]
        if kind == "cols":
            return tensor.chunk(size, dim=1)[rank]
        if kind == "kv_rows":
            if self.kv_heads % size == 0:
                return tensor.chunk(size, dim=0)[rank]
            head = rank * self.kv_heads // size  # the KV head this rank's query heads use
            return tensor.narrow(0, head * self.head_dim, self.head_dim)
        if kind == "rank0":
            return tensor if rank == 0 else torch.zeros_like(tensor)
        if kind == "vocab":
            start = rank * self.vocab_shard
            part = tensor[start : start + self.vocab_shard]
            if part.shape[0] < self.vocab_shard:  # the padding rows: never a real token's
                pad = tensor.new_zeros(self.vocab_shard - part.shape[0], *tensor.shape[1:])
                part = torch.cat([part, pad])
            return part
        return tensor
