"""KVPool / ReqToTokenPool accounting."""

from __future__ import annotations

import pytest
import torch

from research_rt.cache.kv_pool import KVPool, ReqToTokenPool


def make_pool(n: int = 16) -> KVPool:
    return KVPool(n, num_layers=2, kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")


def test_buffers_have_dummy_slot():
    pool = make_pool(16)
    assert len(pool.k_buffers) == len(pool.v_buffers) == 2
    assert pool.k_buffers[0].shape == (17, 2, 4)
    assert pool.bytes_per_token() == 2 * 2 * 2 * 4 * 4


def test_alloc_free_accounting():
    pool = make_pool(16)
    assert pool.available_size() == 16
    a = pool.alloc(5)
    b = pool.alloc(7)
    assert a is not None and b is not None
    assert len(a) == 5 and len(b) == 7
    assert pool.available_size() == 4
    assert not set(a.tolist()) & set(b.tolist())
    pool.free(a)
    assert pool.available_size() == 9
    pool.free(torch.empty(0, dtype=torch.int64))
    assert pool.available_size() == 9
    c = pool.alloc(9)
    assert c is not None
    assert not set(c.tolist()) & set(b.tolist())
    assert pool.available_size() == 0
    pool.free(b)
    pool.free(c)
    assert sorted(pool.free_slots.tolist()) == list(range(1, 17))


def test_alloc_zero():
    pool = make_pool(4)
    out = pool.alloc(0)
    assert out is not None and out.numel() == 0
    assert pool.available_size() == 4


def test_alloc_beyond_free_takes_nothing():
    pool = make_pool(8)
    a = pool.alloc(6)
    assert a is not None
    before = pool.free_slots.clone()
    assert pool.alloc(3) is None
    assert torch.equal(pool.free_slots, before)
    assert pool.available_size() == 2
    assert pool.alloc(9) is None
    got = pool.alloc(2)
    assert got is not None and len(got) == 2


def test_dummy_slot_never_handed_out():
    pool = make_pool(10)
    seen: list[int] = []
    for _ in range(3):  # churn the free list a few times
        slots = [pool.alloc(1) for _ in range(10)]
        assert all(s is not None for s in slots)
        ids = [int(s[0]) for s in slots]  # type: ignore[index]
        assert 0 not in ids
        assert sorted(ids) == list(range(1, 11))
        seen.extend(ids)
        assert pool.alloc(1) is None
        for s in reversed(slots):
            pool.free(s)  # type: ignore[arg-type]
    assert 0 not in seen


def test_clear_restores_all():
    pool = make_pool(8)
    pool.alloc(5)
    pool.clear()
    assert pool.available_size() == 8
    assert sorted(pool.free_slots.tolist()) == list(range(1, 9))


def test_req_to_token_rows():
    rt = ReqToTokenPool(max_reqs=3, context_len=10, device="cpu")
    assert rt.table.shape[0] == 4  # plus the dummy row
    assert rt.table.shape[1] >= 10
    assert rt.dummy_row == 3
    rows = [rt.alloc() for _ in range(3)]
    assert sorted(rows) == [0, 1, 2]  # type: ignore[type-var]
    assert rt.dummy_row not in rows
    assert rt.available_size() == 0
    assert rt.alloc() is None
    rt.free(rows[1])  # type: ignore[arg-type]
    assert rt.available_size() == 1
    assert rt.alloc() == rows[1]
    rt.clear()
    assert rt.available_size() == 3


def test_req_to_token_double_free_asserts():
    rt = ReqToTokenPool(max_reqs=2, context_len=4, device="cpu")
    row = rt.alloc()
    assert row is not None
    rt.free(row)
    with pytest.raises(AssertionError):
        rt.free(row)
    with pytest.raises(AssertionError):
        rt.free(1 - row)  # never allocated, already free
