"""SmolLM2-135M's linear layers (30 x qkv, o, gate_up, down, plus the LM head) in bfloat16 for a few
input rows: the C++ gemv op against `F.linear` (oneDNN), best of 5 passes, with the weight bytes
streamed per second. The op's row limits (kernels/csrc/gemv.cpp) come from this table.

.venv/bin/python -m benchmarks.bench_linear_rows [ROWS ...]   (default 1 2 4 5 8 16 32)
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from research_rt.kernels import gemv_op

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)] * 30 + [(576, 49152)]  # (K, N)


def best_seconds(f, weights: list[torch.Tensor], rows: int, reps: int = 5) -> float:
    xs = {k: torch.randn(rows, k).bfloat16() for k in {w.shape[1] for w in weights}}
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for w in weights:
            f(xs[w.shape[1]], w)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    op = gemv_op()
    if op is None:
        raise SystemExit("the C++ extension did not build here")
    torch.manual_seed(0)
    weights = [torch.randn(n, k).bfloat16() for k, n in SHAPES]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    for rows in [int(a) for a in sys.argv[1:]] or [1, 2, 4, 5, 8, 16, 32]:
        a = best_seconds(lambda x, w: F.linear(x, w), weights, rows)
        b = best_seconds(lambda x, w: op(x, w, None), weights, rows)
        print(
            f"rows {rows:3d}  F.linear {a * 1e3:7.2f} ms ({nbytes / a / 1e9:5.1f} GB/s)"
            f"  gemv op {b * 1e3:7.2f} ms ({nbytes / b / 1e9:5.1f} GB/s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
