"""Micro-benchmarks (pytest-benchmark): attention, radix match/insert, sampler.

    .venv/bin/python -m pytest benchmarks/test_micro.py --benchmark-only

Not part of `make test` (tests/ is the test path); each also asserts its result is sane.
"""

from __future__ import annotations

import random

import pytest
import torch

from research_rt.cache.kv_pool import KVPool
from research_rt.cache.radix_cache import RadixCache
from research_rt.core.forward_batch import ForwardBatch, ForwardMode
from research_rt.core.req import Req
from research_rt.core.sampling_params import SamplingParams
from research_rt.executor.attention.torch_native import TorchNativeAttnBackend
from research_rt.sampling.sampler import Sampler


class _Layer:
    layer_id, num_heads, num_kv_heads, head_dim, scaling = 0, 9, 3, 64, 64**-0.5


@pytest.mark.parametrize("bs", [1, 16, 64])
def test_decode_attention(benchmark, bs):
    seq = 512
    pool = KVPool(bs * seq + 8, 1, 3, 64, torch.bfloat16, "cpu")
    for buf in pool.k_buffers + pool.v_buffers:  # the pool starts uninitialized (but its dummy slot)
        buf[1:].normal_()
    rows = torch.arange(1, bs * seq + 1).view(bs, seq)
    backend = TorchNativeAttnBackend()
    batch = ForwardBatch(
        ForwardMode.DECODE,
        bs,
        torch.zeros(bs, dtype=torch.long),
        torch.zeros(bs, dtype=torch.long),
        rows[:, -1].clone(),
        backend.build_metadata(ForwardMode.DECODE, [seq - 1] * bs, [1] * bs, rows),
        kv_pool=pool,
    )
    q = torch.randn(bs, 9, 64, dtype=torch.bfloat16)
    k = torch.randn(bs, 3, 64, dtype=torch.bfloat16)
    out = benchmark(backend.forward, q, k, k.clone(), _Layer(), batch)
    assert out.shape == (bs, 9 * 64) and torch.isfinite(out.float()).all()


def test_radix_match_insert(benchmark):
    rng = random.Random(0)
    prefix = [rng.randrange(50000) for _ in range(1024)]
    seqs = [prefix + [rng.randrange(50000) for _ in range(64)] for _ in range(64)]

    def work():
        pool = KVPool(64 * 1100, 1, 1, 8, torch.float32, "cpu")
        tree = RadixCache(pool)
        for s in seqs:
            matched, _ = tree.match_prefix(s)
            slots = torch.cat([matched, pool.alloc(len(s) - len(matched))])
            dup = tree.insert(s, slots)
            pool.free(slots[len(matched) : dup])
        return tree

    tree = benchmark(work)
    tree.check_integrity()


@pytest.mark.parametrize("greedy", [True, False])
def test_sampler(benchmark, greedy):
    bs, vocab = 32, 49152
    logits = torch.randn(bs, vocab)
    params = {"temperature": 0} if greedy else {"temperature": 0.8, "top_p": 0.9, "top_k": 50}
    reqs = [
        Req(
            rid=str(i),
            input_ids=[1, 2],
            sampling=SamplingParams.from_dict(params).normalize(),
            generator=torch.Generator().manual_seed(i),
        )
        for i in range(bs)
    ]
    result = benchmark(Sampler(), logits, reqs, False)
    assert len(result.next_ids) == bs
