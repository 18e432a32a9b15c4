"""One request's prefill attention, the extend op against padded SDPA, over prompts and cached
prefixes, for one request (the backend runs the op for every extend: executor/attention/torch_native.py).
SmolLM2-135M's layer shape, bfloat16, best of 5 (benchmarks/bench_extend_attention.py's timing).

PYTHONPATH=. .venv/bin/python -m benchmarks.bench_extend_rule
"""

from __future__ import annotations

import torch

from benchmarks.bench_extend_attention import batch, time_path
from research_rt.kernels import extend_attention_op

CASES = [
    (0, 256),
    (0, 512),
    (0, 1024),
    (0, 2048),
    (512, 512),
    (1024, 512),
    (1536, 512),
    (2048, 512),
    (3584, 512),
]


def main() -> None:
    if extend_attention_op(torch.bfloat16, 64) is None:
        raise SystemExit("the C++ extend_attention op does not run on this build or CPU")
    products = torch.ops.research_rt.extend_attention_products()
    print(f"op products {products} (1 bf16 pairs, 2 float32, 3 AMX tiles); ms", flush=True)
    for cached, new in CASES:
        x = batch([cached], [new])
        sdpa, op = time_path(x, "sdpa"), time_path(x, products)
        print(
            f"cached {cached:5d} new {new:5d}: SDPA {sdpa:6.2f}  op {op:6.2f}  SDPA/op {sdpa / op:4.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
