"""The C++ `research_rt::store_rows` op (kernels/csrc/store_rows.cpp), which eager CPU forwards use
to write K/V rows into the pool (executor/attention/torch_native.py `store_kv`), against
`index_copy_`: the same pool afterwards, exactly."""

from __future__ import annotations

import pytest
import torch

from research_rt.executor.attention import torch_native
from research_rt.executor.attention.torch_native import store_kv
from research_rt.kernels import store_rows_op

store_rows = store_rows_op()
pytestmark = pytest.mark.skipif(store_rows is None, reason="the C++ extension did not build here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [0, 1, 512])
def test_store_rows_equals_index_copy(dtype, tokens):
    g = torch.Generator().manual_seed(tokens)
    pool = torch.randn(1000, 3, 64, generator=g).to(dtype)
    rows = torch.randn(tokens, 3, 64, generator=g).to(dtype)
    slots = torch.randperm(1000, generator=g)[:tokens]
    expected = pool.clone().index_copy_(0, slots, rows)
    store_rows(pool, slots, rows)
    assert torch.equal(pool, expected)


def test_store_rows_takes_strided_rows_and_rejects_bad_input():
    pool = torch.zeros(8, 2, 4)
    qkv = torch.arange(3 * 24, dtype=torch.float32).view(3, 24)
    k = qkv[:, 8:16].view(3, 2, 4)  # a view into a fused row, as the model passes it
    store_rows(pool, torch.tensor([5, 0, 7]), k)
    assert torch.equal(pool[[5, 0, 7]], k)
    with pytest.raises(RuntimeError, match="slot 8 outside"):
        store_rows(pool, torch.tensor([8]), k[:1])
    with pytest.raises(RuntimeError, match="one slot per row"):
        store_rows(pool, torch.tensor([1, 2]), k)
    with pytest.raises(RuntimeError, match="dtype"):
        store_rows(pool, torch.tensor([1, 2, 3]), k.bfloat16())


def test_store_kv_uses_the_op_in_eager_inference_and_index_copy_otherwise(monkeypatch):
    calls = []
    monkeypatch.setattr(torch_native, "store_rows_op", lambda: calls.append(1) or store_rows)
    k_buf, v_buf = torch.zeros(16, 2, 8), torch.zeros(16, 2, 8)
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    slots = torch.tensor([3, 9, 1, 15])
    with torch.inference_mode():
        store_kv(k_buf, v_buf, slots, k, v)
    ref_k, ref_v = torch.zeros(16, 2, 8), torch.zeros(16, 2, 8)
    assert len(calls) == 1
    store_kv(ref_k, ref_v, slots, k, v)  # grad mode: index_copy_
    assert len(calls) == 1
    assert torch.equal(k_buf, ref_k) and torch.equal(v_buf, ref_v) and torch.equal(k_buf[slots], k)
