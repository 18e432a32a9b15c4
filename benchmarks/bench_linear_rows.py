"""SmolLM2-135M's linear layers (30 x qkv, o, gate_up, down, plus the LM head) in bfloat16 for a few
input rows: the C++ gemv op (what compiled decode steps call) against `F.linear` (oneDNN, which
reorders the weight on each call) and oneDNN with the weights reordered once ahead
(`mkldnn._reorder_linear_weight`, the layout vLLM's CPU build keeps), best of 5 passes, with the weight
bytes streamed per second. On CPUs with AMX the op's bfloat16 path is the tile kernel
(`research_rt::amx_linear`). The op's row limits (kernels/csrc/gemv.cpp) come from this table.

.venv/bin/python -m benchmarks.bench_linear_rows [ROWS ...]   (default 1 2 4 5 8 16 32 64 128)
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from research_rt.kernels import amx_linear_available, gemv_op

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
    print(f"gemv op bfloat16 kernel: {'AMX tiles' if amx_linear_available() else 'AVX-512 / plain loop'}")
    torch.manual_seed(0)
    weights = [torch.randn(n, k).bfloat16() for k, n in SHAPES]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in weights}

    def prepacked(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, packed[id(w)], None, "none", [], "")

    for rows in [int(a) for a in sys.argv[1:]] or [1, 2, 4, 5, 8, 16, 32, 64, 128]:
        cells = []
        for name, f in (
            ("F.linear", F.linear),
            ("prepacked", prepacked),
            ("gemv op", lambda x, w: op(x, w, None)),
        ):
            t = best_seconds(f, weights, rows)
            cells.append(f"{name} {t * 1e3:7.2f} ms ({nbytes / t / 1e9:5.1f} GB/s)")
        print(f"rows {rows:3d}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
