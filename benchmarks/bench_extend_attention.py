"""Extend (prefill) attention over the KV pool for one SmolLM2-135M layer (9 query heads, 3 KV heads,
head_dim 64, bfloat16): the C++ `extend_attention` op against the SDPA path it replaces (gather
into padded [B, KVH, Lk, D], explicit mask, `F.scaled_dot_product_attention`), on W2's and W3's
batches. Best of 5; GFLOP/s counts the causal work only (4 * D flops per query head and seen key).
`TorchNativeAttnBackend` runs the op for every extend where it runs (a row's bits must not depend on
its batch).

.venv/bin/python -m benchmarks.bench_extend_attention
"""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import torch

from research_rt.core.forward_batch import ForwardMode
from research_rt.executor.attention.torch_native import TorchNativeAttnBackend, TorchNativeMetadata
from research_rt.kernels import amx_linear_available, extend_attention_op

H, KVH, D = 9, 3, 64


def batch(prefix_lens: list[int], extend_lens: list[int]) -> dict:
    """Random pool and queries; each request's keys in scattered slots, as a busy pool has them."""
    lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    slots = torch.randperm(sum(lens) + 1)[: sum(lens)] + 1
    kv_rows = torch.zeros(len(lens), max(lens), dtype=torch.int64)
    at = 0
    for b, n in enumerate(lens):
        kv_rows[b, :n] = slots[at : at + n]
        at += n
    backend = TorchNativeAttnBackend()
    meta = backend.build_metadata(ForwardMode.EXTEND, prefix_lens, extend_lens, kv_rows)
    pool = sum(lens) + 2
    return {
        "q": torch.randn(sum(extend_lens), H, D).bfloat16(),
        "k": torch.randn(pool, KVH, D).bfloat16(),
        "v": torch.randn(pool, KVH, D).bfloat16(),
        "meta": meta,
        "flops": sum(4 * D * H * sum(p + i + 1 for i in range(e)) for p, e in zip(prefix_lens, extend_lens)),
    }


def best_ms(f, reps: int = 5) -> float:
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    if extend_attention_op(torch.bfloat16, D) is None:
        raise SystemExit("the C++ extend_attention op does not run on this build or CPU")
    rng = random.Random(0)
    cases = {
        "W2 chunk: 8 prompts of 32-512": ([0] * 8, [rng.randint(32, 512) for _ in range(8)]),
        "one 37-token chat prompt (W1)": ([0], [37]),
        "one 1024-token prompt": ([0], [1024]),
        "W3 suffixes: 32 x (1024 cached + 32)": ([1024] * 32, [32] * 32),
        "chunked: 512 after 1536 cached": ([1536], [512]),
    }
    names = {"sdpa": "SDPA", 1: "op bf16 pairs", 2: "op float32", 3: "op AMX tiles"}
    chosen = names[torch.ops.research_rt.extend_attention_products()]
    paths = ["sdpa", 1, 2] + ([3] if amx_linear_available() else [])
    print(f"this CPU's products: {chosen}; ms (causal GFLOP/s)", flush=True)
    for name, (prefix, extend) in cases.items():
        x = batch(prefix, extend)
        ms = {path: time_path(x, path) for path in paths}
        cells = "  ".join(f"{names[p]} {t:6.2f} ({x['flops'] / t / 1e6:3.0f})" for p, t in ms.items())
        best_op = min(t for p, t in ms.items() if p != "sdpa")
        print(f"{name:38s} {cells}  best op {ms['sdpa'] / best_op:3.1f}x SDPA", flush=True)


def time_path(x: dict, path) -> float:
    """Milliseconds of the SDPA path ("sdpa") or of the op with products 1 (bf16 pairs) / 2 (float32) /
    3 (AMX tiles)."""
    layer = SimpleNamespace(scaling=D**-0.5, num_heads=H, num_kv_heads=KVH, head_dim=D)
    meta: TorchNativeMetadata = x["meta"]
    q, k, v = x["q"], x["k"], x["v"]
    if path == "sdpa":
        fwd = SimpleNamespace(attn_metadata=meta)
        return best_ms(lambda: TorchNativeAttnBackend._sdpa_extend(q, k, v, layer, fwd))
    op = torch.ops.research_rt.extend_attention
    return best_ms(
        lambda: op(q, k, v, meta.kv_indices, meta.prefix_lens, meta.extend_lens, layer.scaling, path)
    )


if __name__ == "__main__":
    main()
