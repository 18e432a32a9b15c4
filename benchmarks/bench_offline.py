"""Offline throughput and the shared-prefix workload through `Engine`, against transformers.generate.

    .venv/bin/python -m benchmarks.bench_offline [--workload throughput|shared_prefix|all]

throughput:    64 prompts of 32-512 tokens, 128 new tokens each, all submitted at once.
shared_prefix: 32 requests sharing a 1024-token prefix (32-token suffixes), 32 new tokens each,
               with the radix cache on and off.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import (
    hf_generate_tokens_per_s,
    in_own_thread,
    load_hf_smollm,
    random_prompts,
    shared_prefix_prompts,
    timed,
)


def engine_tokens_per_s(prompts: list[list[int]], new_tokens: int, **engine_kwargs) -> tuple[float, float]:
    import research_rt

    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    with research_rt.Engine(**engine_kwargs) as engine:
        engine.generate(input_ids=prompts[0][:16], sampling_params={"max_new_tokens": 4})  # warm up
        engine.flush_cache()
        elapsed, outs = timed(lambda: engine.generate(input_ids=prompts, sampling_params=params))
        engine.check_pool_integrity()
    total = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return total / elapsed, elapsed


def throughput(dtype: str, compile_: bool, hf: bool, mixed: bool = False) -> dict[str, float]:
    from research_rt.loader.model_loader import load_tokenizer
    from research_rt.loader.resolve import resolve_model_path

    tok = load_tokenizer(resolve_model_path(None))
    prompts = random_prompts(tok, 64, 32, 512, seed=0)
    rows = {}
    tps, el = engine_tokens_per_s(
        prompts,
        128,
        dtype=dtype,
        enable_torch_compile=compile_,
        disable_background_compile=True,
        enable_mixed_chunk=mixed,
    )
    rows[f"research_rt {dtype}{' compile' if compile_ else ''}{' mixed-chunk' if mixed else ''}"] = tps
    print(
        f"throughput research_rt {dtype} compile={compile_} mixed_chunk={mixed}: {tps:.1f} tok/s ({el:.1f} s)",
        flush=True,
    )
    if hf:
        # on a thread of its own: torch ops on this thread would slow the shared-prefix engines by half
        hf_tps = in_own_thread(
            lambda: hf_generate_tokens_per_s(load_hf_smollm(torch.bfloat16), prompts, 128, 16)
        )
        rows["transformers bf16 batch16"] = hf_tps
        print(f"throughput transformers bf16 static batches of 16: {hf_tps:.1f} tok/s", flush=True)
    return rows


def shared_prefix(dtype: str, compile_: bool) -> dict[str, float]:
    import research_rt

    prompts = shared_prefix_prompts()
    params = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    rows = {}
    for radix in (True, False):
        with research_rt.Engine(
            dtype=dtype,
            enable_torch_compile=compile_,
            disable_background_compile=True,
            disable_radix_cache=not radix,
        ) as e:
            e.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
            e.flush_cache()
            elapsed, _ = timed(lambda e=e: e.generate(input_ids=prompts, sampling_params=params))
            e.check_pool_integrity()
        rows[f"shared prefix seconds radix={'on' if radix else 'off'}"] = elapsed
        print(f"shared prefix ({dtype}, radix {'on' if radix else 'off'}): {elapsed:.2f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="all", choices=["throughput", "shared_prefix", "all"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--enable-mixed-chunk", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows: dict[str, float] = {}
    if args.workload in ("throughput", "all"):
        rows |= throughput(args.dtype, args.compile, not args.no_hf, args.enable_mixed_chunk)
    if args.workload in ("shared_prefix", "all"):
        rows |= shared_prefix(args.dtype, args.compile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
