"""TorchNativeAttnBackend vs a naive per-request causal attention reference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from research_rt.cache.kv_pool import KVPool, ReqToTokenPool
from research_rt.core.forward_batch import ForwardBatch, ForwardMode
from research_rt.executor.attention.torch_native import (
    TorchNativeAttnBackend,
    TorchNativeMetadata,
    build_attention_metadata,
)

D = 8


def naive(q, keys, values, prefix, scale, num_heads, num_kv_heads):
    """q [E, H, D] for positions prefix..prefix+E-1; keys/values [prefix+E, KVH, D] -> [E, H*D]."""
    group = num_heads // num_kv_heads
    out = torch.zeros(q.shape[0], num_heads, D, dtype=torch.float64)
    for i in range(q.shape[0]):
        visible = prefix + i + 1
        for h in range(num_heads):
            kh = h // group
            scores = torch.stack([(q[i, h] * keys[j, kh]).sum() * scale for j in range(visible)])
            w = torch.softmax(scores, 0)
            out[i, h] = sum(w[j] * values[j, kh] for j in range(visible))
    return out.reshape(q.shape[0], num_heads * D)


def setup(prefix_lens, extend_lens, num_heads, num_kv_heads, seed):
    g = torch.Generator().manual_seed(seed)
    pool = KVPool(128, 1, num_kv_heads, D, torch.float64, "cpu")
    # scramble the free list so slots are not contiguous per request
    pool.free_slots = pool.free_slots[torch.randperm(128, generator=g)]
    # garbage (but finite) in the dummy slot must never leak into results
    pool.k_buffers[0][0] = 1e3
    pool.v_buffers[0][0] = -1e3
    rt = ReqToTokenPool(len(prefix_lens) + 1, 64, "cpu")
    rt.alloc()  # so request rows are not simply 0..B-1
    rows, all_keys, all_vals, qs, ks, vs, out_loc = [], [], [], [], [], [], []
    for p, e in zip(prefix_lens, extend_lens):
        row = rt.alloc()
        slots = pool.alloc(p + e)
        rt.table[row, : p + e] = slots
        keys = torch.randn(p + e, num_kv_heads, D, generator=g, dtype=torch.float64)
        vals = torch.randn(p + e, num_kv_heads, D, generator=g, dtype=torch.float64)
        pool.k_buffers[0][slots[:p]] = keys[:p]
        pool.v_buffers[0][slots[:p]] = vals[:p]
        rows.append(row)
        all_keys.append(keys)
        all_vals.append(vals)
        qs.append(torch.randn(e, num_heads, D, generator=g, dtype=torch.float64))
        ks.append(keys[p:])
        vs.append(vals[p:])
        out_loc.append(slots[p:])
    layer = SimpleNamespace(
        layer_id=0, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=D, scaling=D**-0.5
    )
    return pool, rt, rows, all_keys, all_vals, qs, ks, vs, torch.cat(out_loc), layer


def make_batch(mode, prefix_lens, extend_lens, table_rows, out_loc, pool) -> ForwardBatch:
    kv_indices, mask, q_gather, q_scatter = build_attention_metadata(
        mode, prefix_lens, extend_lens, table_rows
    )
    lens = [torch.tensor(x, dtype=torch.int64) for x in (prefix_lens, extend_lens)]
    return ForwardBatch(
        mode=mode,
        batch_size=len(prefix_lens),
        input_ids=torch.zeros(len(out_loc), dtype=torch.int64),
        positions=torch.zeros(len(out_loc), dtype=torch.int64),
        out_cache_loc=out_loc,
        attn_metadata=TorchNativeMetadata(kv_indices, mask, q_gather, q_scatter, *lens),
        kv_pool=pool,
        attn_backend=TorchNativeAttnBackend(),
    )


def run_backend(mode, prefix_lens, extend_lens, num_heads, num_kv_heads, seed=0):
    pool, rt, rows, all_keys, all_vals, qs, ks, vs, out_loc, layer = setup(
        prefix_lens, extend_lens, num_heads, num_kv_heads, seed
    )
    batch = make_batch(mode, prefix_lens, extend_lens, rt.table[torch.tensor(rows)], out_loc, pool)
    q = torch.cat(qs)  # [T, H, D] as the models pass it
    out = batch.attn_backend.forward(q, torch.cat(ks), torch.cat(vs), layer, batch)
    assert out.shape == (len(out_loc), num_heads * D)
    # new keys/values were written into the pool at out_cache_loc
    assert torch.equal(pool.k_buffers[0][out_loc], torch.cat(ks))
    assert torch.equal(pool.v_buffers[0][out_loc], torch.cat(vs))
    start = 0
    for b, (p, e) in enumerate(zip(prefix_lens, extend_lens)):
        want = naive(qs[b], all_keys[b], all_vals[b], p, layer.scaling, num_heads, num_kv_heads)
        got = out[start : start + e]
        assert torch.allclose(got, want, atol=1e-9, rtol=1e-7), f"request {b} differs"
        start += e


def test_sdpa_extend_gives_each_request_its_bits_alone():
    """The SDPA path (no C++ op for float64): a request's rows in a batch are the bits it gets as a
    batch of one (SDPA over a padded batch changed them: see _sdpa_extend)."""
    prefix_lens, extend_lens = [0, 5, 2, 9, 0], [4, 1, 7, 3, 11]
    pool, rt, rows, _, _, qs, ks, vs, out_loc, layer = setup(prefix_lens, extend_lens, 4, 2, seed=2)
    table = rt.table[torch.tensor(rows)]
    batch = make_batch(ForwardMode.EXTEND, prefix_lens, extend_lens, table, out_loc, pool)
    out = batch.attn_backend.forward(torch.cat(qs), torch.cat(ks), torch.cat(vs), layer, batch)
    start = 0
    for b, (p, e) in enumerate(zip(prefix_lens, extend_lens)):
        one = make_batch(ForwardMode.EXTEND, [p], [e], table[b : b + 1], out_loc[start : start + e], pool)
        alone = one.attn_backend._extend(qs[b], pool.k_buffers[0], pool.v_buffers[0], layer, one)
        assert torch.equal(out[start : start + e], alone), f"request {b}"
        start += e


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_extend_mixed_batch(heads):
    run_backend(ForwardMode.EXTEND, [0, 5, 2, 9], [4, 1, 7, 3], *heads)


def test_extend_single_request_no_prefix():
    run_backend(ForwardMode.EXTEND, [0], [6], 2, 1, seed=3)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 2)])
def test_decode_mixed_lengths(heads):
    run_backend(ForwardMode.DECODE, [0, 3, 11, 6], [1, 1, 1, 1], *heads, seed=1)


def test_metadata_shapes_and_padding():
    table = torch.arange(1, 1 + 3 * 10).reshape(3, 10)
    kv, mask, qg, qs = build_attention_metadata(ForwardMode.EXTEND, [2, 0, 4], [3, 1, 2], table)
    assert kv.shape == (3, 6) and mask.shape == (3, 1, 3, 6)
    assert kv[1, 1:].eq(0).all() and kv[0, 5] == 0 and kv[0, :5].tolist() == table[0, :5].tolist()
    # query 0 of request 0 sits at position 2 and sees keys 0..2
    assert mask[0, 0, 0].tolist() == [True, True, True, False, False, False]
    # padded query (request 1, index 1) sees only the dummy key
    assert mask[1, 0, 1].tolist() == [True, False, False, False, False, False]
    assert qg.tolist() == [[0, 1, 2], [3, 6, 6], [4, 5, 6]]
    assert qs.tolist() == [0, 1, 2, 3, 6, 7]
    kv, mask, qg, qs = build_attention_metadata(ForwardMode.DECODE, [2, 0], [1, 1], table[:2], pad_kv_to=8)
    assert kv.shape == (2, 8) and qg is None and qs is None
    assert mask[0, 0, 0].tolist() == [True] * 3 + [False] * 5
