"""The C++ extend-attention op (research_rt/kernels/csrc/extend_attention.cpp) against attention in
float32 on the same bfloat16 inputs, and against the backend's SDPA path, with each of its inner
products (1: VDPBF16PS on bfloat16 pairs, 2: float32 FMAs, 3: AMX tiles for the scores where the CPU
has them; a CPU runs one of them by default). A float32 pool takes the float32 FMAs: within 1e-5 of
SDPA in float32 (sums of up to ~1000 products of O(1) terms in another order).

Tolerance: 2e-2 absolute on outputs of magnitude up to ~3 (|q.k| scaled to O(1), values ~N(0, 1)).
The op keeps scores, softmax and sums in float32; products 1 rounds the probabilities to bfloat16
before multiplying the values (as flash attention does for its second matmul: ~2^-9 relative per
term); the output is rounded once, and one bfloat16 rounding of an output in [2, 4) is up to 2^-7 =
0.0078. A scale off by 5% moves outputs by ~0.1.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from research_rt.core.forward_batch import ForwardMode
from research_rt.executor.attention.torch_native import TorchNativeAttnBackend
from research_rt.kernels import amx_linear_available, extend_attention_op

pytestmark = pytest.mark.skipif(
    extend_attention_op(torch.bfloat16, 64) is None, reason="the op needs the C++ extension and AVX512-BF16"
)
TILES = pytest.param(3, marks=pytest.mark.skipif(not amx_linear_available(), reason="no AMX tiles here"))
PRODUCTS = [1, 2, TILES]


def make_case(heads, kv_heads, d, prefix_lens, extend_lens, seed, dtype=torch.bfloat16):
    """A pool whose slots are scattered at random (as a busy server has them), slot 0 a dummy row of
    huge values that no real key may see, and queries for each request's new tokens."""
    g = torch.Generator().manual_seed(seed)
    lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    slots = 1 + torch.randperm(sum(lens) + 50, generator=g)
    k_buf = torch.randn(len(slots) + 1, kv_heads, d, generator=g).to(dtype)
    v_buf = torch.randn(len(slots) + 1, kv_heads, d, generator=g).to(dtype)
    k_buf[0], v_buf[0] = 1e3, -1e3
    rows = torch.zeros(len(lens), max(lens), dtype=torch.int64)
    start = 0
    for b, n in enumerate(lens):
        rows[b, :n] = slots[start : start + n]
        start += n
    meta = TorchNativeAttnBackend().build_metadata(ForwardMode.EXTEND, prefix_lens, extend_lens, rows)
    q = torch.randn(sum(extend_lens), heads, d, generator=g).to(dtype)
    return q, k_buf, v_buf, meta


def reference(q, k_buf, v_buf, meta, scale):
    """Request by request in float32: query i of request b at position prefix + i sees keys 0..prefix + i."""
    out, start = [], 0
    for b, (p, e) in enumerate(zip(meta.prefix_lens.tolist(), meta.extend_lens.tolist())):
        slots = meta.kv_indices[b, : p + e]
        keys, values = k_buf[slots].float().transpose(0, 1), v_buf[slots].float().transpose(0, 1)
        queries = q[start : start + e].float().transpose(0, 1)
        mask = torch.arange(p + e)[None, :] <= p + torch.arange(e)[:, None]
        o = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
        out.append(o.transpose(0, 1).reshape(e, -1))
        start += e
    return torch.cat(out)


# (heads, kv_heads, head_dim, prefix_lens, extend_lens): SmolLM2's 9/3 heads of 64; group sizes 1, 2,
# 3, 12 (a group of 12 leaves room for 5 positions per item); lengths around the 32-key blocks and
# the 16-lane row vectors; a prefix that ends mid-block; one-token extends next to long ones
CASES = [
    (9, 3, 64, [0], [37]),
    (9, 3, 64, [0, 5, 100], [7, 40, 33]),
    (9, 3, 64, [0], [300]),
    (9, 3, 64, [1024, 1024], [32, 32]),
    (4, 2, 32, [3, 0], [70, 1]),
    (8, 8, 128, [50], [17]),
    (12, 1, 64, [0, 31, 32, 33], [64, 1, 2, 65]),
    (6, 2, 128, [0, 63, 64], [16, 16, 129]),
]


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("heads,kv_heads,d,prefix_lens,extend_lens", CASES)
def test_matches_float32_attention(heads, kv_heads, d, prefix_lens, extend_lens, products):
    q, k_buf, v_buf, meta = make_case(heads, kv_heads, d, prefix_lens, extend_lens, seed=d + sum(extend_lens))
    op = extend_attention_op(torch.bfloat16, d)
    out = op(q, k_buf, v_buf, meta.kv_indices, meta.prefix_lens, meta.extend_lens, d**-0.5, products)
    assert out.dtype == torch.bfloat16 and out.shape == (q.shape[0], heads * d)
    torch.testing.assert_close(out.float(), reference(q, k_buf, v_buf, meta, d**-0.5), rtol=0, atol=2e-2)


@pytest.mark.parametrize("heads,kv_heads,d,prefix_lens,extend_lens", CASES)
def test_float32_matches_float32_attention(heads, kv_heads, d, prefix_lens, extend_lens):
    q, k_buf, v_buf, meta = make_case(heads, kv_heads, d, prefix_lens, extend_lens, 7, torch.float32)
    op = extend_attention_op(torch.float32, d)
    out = op(q, k_buf, v_buf, meta.kv_indices, meta.prefix_lens, meta.extend_lens, d**-0.5)
    assert out.dtype == torch.float32 and out.shape == (q.shape[0], heads * d)
    expected = reference(q, k_buf, v_buf, meta, d**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(
        out, op(q, k_buf, v_buf, meta.kv_indices, meta.prefix_lens, meta.extend_lens, d**-0.5, 2)
    )


def test_float32_takes_only_the_float32_products():
    q, k_buf, v_buf, meta = make_case(9, 3, 64, [0], [5], 0, torch.float32)
    with pytest.raises(RuntimeError, match="float32 pool takes products 0 or 2"):
        extend_attention_op(torch.float32, 64)(
            q, k_buf, v_buf, meta.kv_indices, meta.prefix_lens, meta.extend_lens, 0.125, 1
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cached", [1, 31, 32, 33, 100, 160])
def test_a_suffix_gets_the_bits_of_its_whole_prompt(dtype, cached):
    """A prompt's positions past `cached` tokens (a radix-cache hit, or the next prefill chunk) get
    the bits they get when the whole prompt runs at once: greedy tokens do not depend on the chunk
    size or on cache hits. (SDPA over the suffix against the whole prompt differed in the last bits
    of float32 outputs.)"""
    n = 161
    q, k_buf, v_buf, meta = make_case(9, 3, 64, [0], [n], seed=cached, dtype=dtype)
    op = extend_attention_op(dtype, 64)
    whole = op(q, k_buf, v_buf, meta.kv_indices, meta.prefix_lens, meta.extend_lens, 0.125)
    suffix = op(
        q[cached:], k_buf, v_buf, meta.kv_indices, torch.tensor([cached]), torch.tensor([n - cached]), 0.125
    )
    assert torch.equal(suffix, whole[cached:])


@pytest.mark.parametrize("heads,kv_heads,d,prefix_lens,extend_lens", CASES[:4])
def test_matches_the_sdpa_path(heads, kv_heads, d, prefix_lens, extend_lens):
    """The backend's two extend paths agree, so which one a batch takes does not change its output
    beyond bfloat16 rounding."""
    q, k_buf, v_buf, meta = make_case(heads, kv_heads, d, prefix_lens, extend_lens, seed=1)
    layer = SimpleNamespace(scaling=d**-0.5, num_heads=heads, num_kv_heads=kv_heads, head_dim=d)
    sdpa = TorchNativeAttnBackend._sdpa_extend(q, k_buf, v_buf, layer, SimpleNamespace(attn_metadata=meta))
    out = extend_attention_op(torch.bfloat16, d)(
        q, k_buf, v_buf, meta.kv_indices, meta.prefix_lens, meta.extend_lens, d**-0.5
    )
    torch.testing.assert_close(out.float(), sdpa.float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("products", PRODUCTS)
def test_each_request_gets_what_it_gets_alone(products):
    """Requests share work items only with themselves: a request's rows are bit-identical whether it
    runs alone or beside others (greedy output does not depend on batch composition)."""
    q, k_buf, v_buf, meta = make_case(9, 3, 64, [0, 40, 7], [50, 20, 90], seed=3)
    op = extend_attention_op(torch.bfloat16, 64)
    together = op(q, k_buf, v_buf, meta.kv_indices, meta.prefix_lens, meta.extend_lens, 0.125, products)
    start = 0
    for b in range(3):
        e = int(meta.extend_lens[b])
        alone = op(
            q[start : start + e],
            k_buf,
            v_buf,
            meta.kv_indices[b : b + 1],
            meta.prefix_lens[b : b + 1],
            meta.extend_lens[b : b + 1],
            0.125,
            products,
        )
        assert torch.equal(alone, together[start : start + e]), b
        start += e


def test_default_products_are_this_cpus_choice():
    """products=0 runs this CPU's choice (AMX: tiles, other Intel: float32, else bfloat16 pairs), bit
    for bit."""
    chosen = torch.ops.research_rt.extend_attention_products()
    assert chosen == (3 if amx_linear_available() else 2 if "GenuineIntel" in _cpu_vendor() else 1)
    q, k_buf, v_buf, meta = make_case(9, 3, 64, [0, 40], [50, 20], seed=4)
    op = extend_attention_op(torch.bfloat16, 64)
    args = (q, k_buf, v_buf, meta.kv_indices, meta.prefix_lens, meta.extend_lens, 0.125)
    assert torch.equal(op(*args), op(*args, chosen))


def _cpu_vendor() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line for line in f if line.startswith("vendor_id")), "")


def test_other_dtypes_and_head_sizes_take_the_sdpa_path():
    assert extend_attention_op(torch.float16, 64) is None
    assert extend_attention_op(torch.bfloat16, 80) is None
    assert extend_attention_op(torch.float32, 80) is None


@pytest.mark.parametrize(
    "prefix_lens,extend_lens",
    [([0, 5], [40, 300]), ([0], [37]), ([0], [300]), ([1024], [300]), ([1024], [32])],
)
def test_backend_takes_the_op_for_every_extend(prefix_lens, extend_lens):
    """Several requests, one short prompt, one long prompt, a suffix over a cached prefix: always the
    op, whatever its products on this CPU, so a request's rows have the same bits alone and in a
    batch. (SDPA for one long prompt where the products are float32 gave it other bits.)"""
    q, k_buf, v_buf, meta = make_case(9, 3, 64, prefix_lens, extend_lens, seed=5)
    layer = SimpleNamespace(scaling=0.125, num_heads=9, num_kv_heads=3, head_dim=64)
    batch = SimpleNamespace(attn_metadata=meta)
    got = TorchNativeAttnBackend._extend(q, k_buf, v_buf, layer, batch)
    expected = extend_attention_op(torch.bfloat16, 64)(
        q, k_buf, v_buf, meta.kv_indices, meta.prefix_lens, meta.extend_lens, 0.125
    )
    assert torch.equal(got, expected)
