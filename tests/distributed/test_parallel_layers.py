"""Each parallel layer at tp 2 (two gloo processes) against the full layer, float32, atol 1e-5."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from research_rt.distributed.group import TPInfo, destroy_tp_group, init_tp_group
from research_rt.distributed.layers import (
    RowParallelExperts,
    RowParallelLinear,
    VocabParallelEmbedding,
    as_parallel,
    gathered_logits,
)
from research_rt.loader.tp_sharding import TPPlan
from research_rt.models.layers.linear import Linear
from research_rt.models.layers.moe import FusedExperts
from research_rt.models.llama import DecoderMLP

SIZE = 2
ATOL = 1e-5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded(module: nn.Module, rules: dict[str, int], rank: int) -> dict[str, torch.Tensor]:
    """`module`'s state cut like the loader does: dim 0 / dim 1 chunks by parameter name."""
    state = {}
    for name, t in module.state_dict().items():
        dim = rules.get(name)
        state[name] = t if dim is None else t.chunk(SIZE, dim=dim)[rank]
    return state


def _check_layers(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    init_tp_group(rank, SIZE, port, "cpu")
    try:
        torch.manual_seed(0)  # the same full layers and inputs on both ranks
        x = torch.randn(5, 16)

        # row-parallel (bias on rank 0 only) against the full linear
        full = Linear(16, 8, bias=True)
        row = Linear(16 // SIZE, 8, bias=True)
        row.load_state_dict(_sharded(full, {"weight": 1}, rank))
        if rank:
            row.bias.data.zero_()
        as_parallel(row, RowParallelLinear)
        torch.testing.assert_close(row(x.chunk(SIZE, dim=1)[rank]), full(x), atol=ATOL, rtol=0)

        # a column-parallel gate_up then row-parallel down: the sharded MLP
        mlp = DecoderMLP(16, 12)
        part = DecoderMLP(16, 12 // SIZE)
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        part.gate_up_proj.weight.data.copy_(torch.cat([gate.chunk(SIZE, 0)[rank], up.chunk(SIZE, 0)[rank]]))
        part.down_proj.weight.data.copy_(mlp.down_proj.weight.chunk(SIZE, 1)[rank])
        as_parallel(part.down_proj, RowParallelLinear)
        torch.testing.assert_close(part(x), mlp(x), atol=ATOL, rtol=0)

        # vocab-parallel embedding over a padded odd vocabulary, and the gathered logits
        vocab = 11
        emb = nn.Embedding(vocab, 16)
        plan = TPPlan(_Cfg(vocab), TPInfo(rank, SIZE))
        local = nn.Embedding(plan.vocab_shard, 16)
        local.weight.data.copy_(plan.shard_tensor("model.embed_tokens.weight", emb.weight))
        as_parallel(local, VocabParallelEmbedding, vocab_start=rank * plan.vocab_shard)
        ids = torch.tensor([0, 5, 6, 10, 3])
        torch.testing.assert_close(local(ids), emb(ids), atol=ATOL, rtol=0)
        logits = gathered_logits(lambda h: h @ local.weight.t(), vocab)
        torch.testing.assert_close(logits(x), x @ emb.weight.t(), atol=ATOL, rtol=0)

        # each expert's matrices sharded on the intermediate dimension
        experts = FusedExperts(4, 16, 8)
        nn.init.normal_(experts.w13)
        nn.init.normal_(experts.w2)
        shard = FusedExperts(4, 16, 8 // SIZE)
        g, u = experts.w13.data.chunk(2, dim=1)
        shard.w13.data.copy_(torch.cat([g.chunk(SIZE, 1)[rank], u.chunk(SIZE, 1)[rank]], dim=1))
        shard.w2.data.copy_(experts.w2.data.chunk(SIZE, 2)[rank])
        as_parallel(shard, RowParallelExperts)
        weights = torch.softmax(torch.randn(5, 2), -1)
        chosen = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2], [3, 1]])
        torch.testing.assert_close(shard(x, weights, chosen), experts(x, weights, chosen), atol=1e-4, rtol=0)
        dist.barrier()
    finally:
        destroy_tp_group()


class _Cfg:
    def __init__(self, vocab: int) -> None:
        self.vocab_size, self.num_attention_heads, self.num_key_value_heads = vocab, 4, 2
        self.hidden_size = 16


def test_parallel_layers_match_full_layers_at_tp2():
    mp.spawn(_check_layers, args=(_port(),), nprocs=SIZE, join=True)
