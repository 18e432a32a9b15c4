"""Single-stream greedy decode speed: research_rt (eager / compiled, float32 / bfloat16) vs transformers.

.venv/bin/python -m benchmarks.bench_single_stream [--new-tokens 128] [--configs eager-bf16,compile-bf16]
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from benchmarks.common import (
    STORY,
    hf_generate_tokens_per_s,
    in_own_thread,
    load_hf_smollm,
    read_bandwidth_bytes_per_s,
    timed,
    weight_bytes_per_token,
)

CONFIGS = {
    "eager-fp32": dict(dtype="float32", enable_torch_compile=False),
    "eager-bf16": dict(dtype="bfloat16", enable_torch_compile=False),
    "compile-fp32": dict(dtype="float32", enable_torch_compile=True, disable_background_compile=True),
    "compile-bf16": dict(dtype="bfloat16", enable_torch_compile=True, disable_background_compile=True),
    # weight-only quantized linears for batch-1 decode (research_rt/models/layers/quant.py)
    "compile-bf16-int8wo": dict(
        dtype="bfloat16", enable_torch_compile=True, disable_background_compile=True, torchao_config="int8wo"
    ),
    "compile-bf16-int4wo": dict(
        dtype="bfloat16",
        enable_torch_compile=True,
        disable_background_compile=True,
        torchao_config="int4wo-32",
    ),
}


def research_rt_tokens_per_s(config: dict, new_tokens: int) -> tuple[float, float]:
    import research_rt

    with research_rt.Engine(max_total_tokens=4096, **config) as engine:
        params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
        warm, _ = timed(lambda: engine.generate(STORY, params))  # includes compilation
        best = min(timed(lambda: engine.generate(STORY, params))[0] for _ in range(2))
    return new_tokens / best, warm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--hf", default="fp32,bf16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = {}
    bound = {}  # dtype -> the read-bandwidth bound in tok/s, measured in this run
    for name in filter(None, args.configs.split(",")):
        tps, warm = research_rt_tokens_per_s(CONFIGS[name], args.new_tokens)
        rows[f"research_rt {name}"] = tps
        dt = torch.float32 if CONFIGS[name]["dtype"] == "float32" else torch.bfloat16
        if dt not in bound:
            # on a thread of its own: torch ops on this thread would slow the next engines by half
            bound[dt] = in_own_thread(read_bandwidth_bytes_per_s) / in_own_thread(
                functools.partial(weight_bytes_per_token, dt)
            )
            rows[f"bandwidth bound {dt}".replace("torch.", "")] = bound[dt]
        print(
            f"research_rt {name:14s} {tps:7.1f} tok/s   (first request {warm:.1f} s; "
            f"{tps / bound[dt]:.0%} of the {bound[dt]:.0f} tok/s read-bandwidth bound)",
            flush=True,
        )
    for dt in filter(None, args.hf.split(",")):
        from transformers import AutoTokenizer  # noqa: F401

        model = load_hf_smollm(torch.float32 if dt == "fp32" else torch.bfloat16)
        from research_rt.loader.model_loader import load_tokenizer
        from research_rt.loader.resolve import resolve_model_path

        ids = load_tokenizer(resolve_model_path(None)).encode(STORY)
        hf_generate_tokens_per_s(model, [ids], 8, 1)
        tps = max(hf_generate_tokens_per_s(model, [ids], args.new_tokens, 1) for _ in range(2))
        rows[f"transformers {dt}"] = tps
        print(f"transformers {dt:16s} {tps:7.1f} tok/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
