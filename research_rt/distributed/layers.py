"""The layers a tensor-parallel rank runs in place of the plain ones (same parameters, sharded).

Each is a subclass of the plain layer that adds its collective; the loader turns a built
module into one by name (`as_parallel`), so model files never name them:
- column-parallel linears (fused qkv, gate_up, each expert's w13) need no new class: their
  output stays sharded along the heads / intermediate units the next layer consumes;
- `RowParallelLinear` (o_proj, down_proj): the partial products are summed by an all-reduce; the
  bias is loaded on rank 0 only (zeros elsewhere), so it is added once;
- `RowParallelExperts`: every expert's matrices are sharded along the intermediate dimension (as a
  dense MLP is), so the routed sum is a partial sum, reduced like down_proj;
- `VocabParallelEmbedding`: each rank holds a contiguous slice of the (padded) vocabulary; a token
  outside it embeds to zeros and the all-reduce fills it in;
- `gathered_logits`: the LM head (or the tied embedding) yields this rank's vocabulary slice; the
  slices are gathered along the vocabulary and the padding cut off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from research_rt.distributed.group import all_gather_last, all_reduce
from research_rt.models.layers.linear import Linear
from research_rt.models.layers.moe import FusedExperts


class RowParallelLinear(Linear):
    """A Linear whose input features are this rank's shard; the output is summed over ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x))


class RowParallelExperts(FusedExperts):
    """FusedExperts holding every expert's intermediate shard; the routed sum is all-reduced."""

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x, topk_weights, topk_ids))


class VocabParallelEmbedding(nn.Embedding):
    """An embedding of vocabulary rows [vocab_start, vocab_start + num_embeddings)."""

    vocab_start: int = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(torch.where(inside, local, 0), self.weight)
        return all_reduce(out * inside.unsqueeze(-1).to(out.dtype))


def as_parallel(module: nn.Module, cls: type[nn.Module], **attrs: object) -> nn.Module:
    """Make `module` (an instance of `cls`'s base) a `cls`, keeping its parameters and storage."""
    if not isinstance(module, cls.__mro__[1]):
        raise TypeError(f"{type(module).__name__} cannot become {cls.__name__}")
    module.__class__ = cls
    for name, value in attrs.items():
        setattr(module, name, value)
    return module


def gathered_logits(compute_logits: Callable[[torch.Tensor], torch.Tensor], vocab_size: int):
    """`compute_logits` over a vocabulary slice -> the full [T, vocab_size] logits on every rank."""

    def compute(hidden: torch.Tensor) -> torch.Tensor:
        return all_gather_last(compute_logits(hidden))[..., :vocab_size]

    return compute
