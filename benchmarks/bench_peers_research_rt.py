"""research_rt on the three `make bench-peers` workloads (W1 single stream, W2 64 prompts, W3 shared
prefix), from the token ids of benchmarks/peers_workloads.py, timed by that file's shared code.

One `Engine` (bfloat16, decode step compiled before serving: the compile-bf16 config of
bench_single_stream.py) runs the workloads asked for (`--only`, default all three); the prefix cache
is flushed before each timed W2/W3 run, so the W3 prefix is computed once inside the timed run, as in
every peer. `--torchao-config int4wo-32` runs the embedded Q4_1's own 4-bit codes (the row beside
llama.cpp's Q4_1; the issue's W1 target is set for bfloat16 weights).

.venv/bin/python -m benchmarks.bench_peers_research_rt WORKLOADS.json [--json OUT.json] [--only w1,w2,w3]
    [--torchao-config int4wo-32]
"""

from __future__ import annotations

import argparse

from benchmarks.peers_workloads import add_only_argument, figures, load, report, save, selected


def bench(work: dict, names: list[str], torchao_config: str = "") -> dict:
    import research_rt

    with research_rt.Engine(
        dtype="bfloat16",
        enable_torch_compile=True,
        disable_background_compile=True,
        torchao_config=torchao_config,
    ) as e:

        def run(prompts: list[list[int]], n: int) -> list[list[int]]:
            params = {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}
            outs = e.generate(input_ids=prompts, sampling_params=params)
            return [o["output_ids"] for o in outs]

        def reset() -> None:
            assert e.flush_cache(), "flush_cache refused"

        row = figures(names, lambda ids, n: run([ids], n)[0], run, reset, work)
        e.check_pool_integrity()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workloads")
    parser.add_argument("--json", default=None)
    parser.add_argument("--torchao-config", default="")
    add_only_argument(parser)
    args = parser.parse_args()
    row = bench(load(args.workloads), selected(args.only), args.torchao_config)
    name = "research_rt compile-bf16" + (f" {args.torchao_config}" if args.torchao_config else "")
    report(name, row)
    save(args.json, {name: row})


if __name__ == "__main__":
    main()
