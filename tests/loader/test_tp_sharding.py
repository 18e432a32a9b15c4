"""TPPlan: the per-rank config and the checkpoint shards, which concatenate back to the tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from research_rt.distributed.group import TPInfo
from research_rt.loader.tp_sharding import TPPlan
from tests.conftest import TINY_COMMON


def config(**kw):
    return AutoConfig.for_model("llama", **{**TINY_COMMON, "num_hidden_layers": 1, "vocab_size": 11, **kw})


def shards(cfg, name, tensor, size=2):
    return [TPPlan(cfg, TPInfo(r, size)).shard_tensor(name, tensor) for r in range(size)]


@pytest.mark.parametrize(
    "name,shape,dim",
    [
        ("model.layers.0.self_attn.q_proj.weight", (64, 64), 0),
        ("model.layers.0.self_attn.q_proj.bias", (64,), 0),
        ("model.layers.0.self_attn.k_proj.weight", (32, 64), 0),
        ("model.layers.0.mlp.gate_proj.weight", (128, 64), 0),
        ("model.layers.0.mlp.up_proj.weight", (128, 64), 0),
        ("model.layers.0.mlp.experts.3.w1.weight", (128, 64), 0),
        ("model.layers.0.self_attn.o_proj.weight", (64, 64), 1),
        ("model.layers.0.mlp.down_proj.weight", (64, 128), 1),
        ("model.layers.0.mlp.experts.3.w2.weight", (64, 128), 1),
    ],
)
def test_shards_concatenate_back(name, shape, dim):
    t = torch.randn(shape)
    parts = shards(config(), name, t)
    assert parts[0].shape != t.shape
    torch.testing.assert_close(torch.cat(parts, dim=dim), t, atol=0, rtol=0)


def test_vocab_padded_and_replicated_and_bias_once():
    cfg = config()
    emb = torch.randn(11, 64)
    parts = shards(cfg, "model.embed_tokens.weight", emb)
    assert [p.shape[0] for p in parts] == [6, 6]
    full = torch.cat(parts)
    torch.testing.assert_close(full[:11], emb, atol=0, rtol=0)
    assert full[11:].abs().sum() == 0  # the padding row
    norm = torch.randn(64)
    assert all(p is norm for p in shards(cfg, "model.layers.0.input_layernorm.weight", norm))
    bias = torch.randn(64)
    b0, b1 = shards(cfg, "model.layers.0.self_attn.o_proj.bias", bias)
    torch.testing.assert_close(b0 + b1, bias, atol=0, rtol=0)


def test_kv_heads_replicated_when_fewer_than_ranks():
    cfg = config(num_attention_heads=8, num_key_value_heads=2)  # head_dim 8; 4 ranks, 2 KV heads
    k = torch.arange(16 * 64, dtype=torch.float32).view(16, 64)
    parts = shards(cfg, "model.layers.0.self_attn.k_proj.weight", k, size=4)
    # ranks 0, 1 hold query heads 0-3 (KV head 0); ranks 2, 3 heads 4-7 (KV head 1)
    for rank, part in enumerate(parts):
        head = rank // 2
        torch.testing.assert_close(part, k[head * 8 : (head + 1) * 8], atol=0, rtol=0)
    rank_cfg = TPPlan(cfg, TPInfo(0, 4)).rank_config()
    assert (rank_cfg.num_attention_heads, rank_cfg.num_key_value_heads, rank_cfg.head_dim) == (2, 1, 8)
    assert rank_cfg.intermediate_size == 32 and rank_cfg.vocab_size == 3


def test_indivisible_sizes_refused():
    with pytest.raises(ValueError, match="attention heads"):
        TPPlan(config(), TPInfo(0, 3))
