"""Single-batch latency by batch size: prefill of the whole batch, then one decode step, research_rt
(through Engine, compiled decode step) next to transformers (the model's forward with its KV cache).

    .venv/bin/python -m benchmarks.bench_latency [--batch-sizes 1,4,16,64] [--prompt-len 256]

Prefill: the time to first token of a batch of equal prompts submitted at once (no cache hits; the
scheduler prefills it in --chunked-prefill-size chunks). Decode: the extra time per generated token
when the same batch generates 33 tokens instead of 1, i.e. the decode step at that batch size.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from benchmarks.common import load_hf_smollm, timed

DECODE_TOKENS = 32


def research_rt_latency(batch_sizes: list[int], prompt_len: int) -> dict[str, dict[str, float]]:
    import research_rt

    rows = {}
    with research_rt.Engine(
        dtype="bfloat16", max_total_tokens=65536, disable_background_compile=True
    ) as engine:
        for i, bs in enumerate([1, *batch_sizes]):  # the first pass warms up (compiles), dropped
            prompts = _prompts(bs, prompt_len, seed=bs)

            def run(new_tokens: int, prompts=prompts) -> float:
                engine.flush_cache()
                params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
                return timed(lambda: engine.generate(input_ids=prompts, sampling_params=params))[0]

            prefill = min(run(1) for _ in range(2))
            decode = (min(run(1 + DECODE_TOKENS) for _ in range(2)) - prefill) / DECODE_TOKENS
            if i:
                rows[f"bs={bs}"] = {"prefill_ms": prefill * 1e3, "decode_step_ms": decode * 1e3}
            engine.check_pool_integrity()
    return rows


def transformers_latency(batch_sizes: list[int], prompt_len: int) -> dict[str, dict[str, float]]:
    model = load_hf_smollm(torch.bfloat16)
    rows = {}
    for i, bs in enumerate([1, *batch_sizes]):
        ids = torch.tensor(_prompts(bs, prompt_len, seed=bs))

        def prefill(ids=ids):
            return model(input_ids=ids, use_cache=True)

        def decode(ids=ids) -> float:
            out = model(input_ids=ids, use_cache=True)
            total = 0.0
            for _ in range(DECODE_TOKENS):
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                dt, out = timed(
                    lambda past=past, nxt=nxt: model(input_ids=nxt, past_key_values=past, use_cache=True)
                )
                total += dt
            return total / DECODE_TOKENS

        with torch.no_grad():
            p = min(timed(prefill)[0] for _ in range(2))
            d = min(decode() for _ in range(2))
        if i:
            rows[f"bs={bs}"] = {"prefill_ms": p * 1e3, "decode_step_ms": d * 1e3}
    return rows


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    results = {"research_rt": research_rt_latency(sizes, args.prompt_len)}
    if not args.no_hf:
        results["transformers"] = transformers_latency(sizes, args.prompt_len)
    print(f"{'':14s} {'batch':>6} {'prefill ms':>11} {'decode step ms':>15}")
    for name, rows in results.items():
        for bs in sizes:
            r = rows[f"bs={bs}"]
            print(f"{name:14s} {bs:>6} {r['prefill_ms']:>11.1f} {r['decode_step_ms']:>15.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
