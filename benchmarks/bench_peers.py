"""llama.cpp (llama-cpp-python) on the three `make bench-peers` workloads, one GGUF after another.

Runs with the llama venv's python (`make bench-peers` sets it up under .peers/llama); does not import
research_rt or torch. Reads the token ids of benchmarks/peers_workloads.py and is timed by that file's
shared code; 2 threads, n_ctx 2048, n_batch 512, greedy (top_k 1), EOS ignored (`generate` never stops
by itself: we stop after N tokens).

llama-cpp-python serves one sequence per `Llama`, so W2's and W3's prompts run one after another.
`Llama.generate` keeps the KV of the previous call and re-evaluates only what follows the longest
common prefix with the new prompt (it trims the KV cache to that prefix with `kv_cache_seq_rm`):
  W1  the repeated prompt is reused up to its last token (as research_rt's radix cache does);
  W2  the random prompts share nothing, so each is prefilled in full;
  W3  the 1024-token prefix is evaluated once (by the first request, inside the timed run: `reset()`
      empties the context before it) and each later request evaluates only its 32-token suffix,
      i.e. the same as evaluating the prefix once and restoring its state for every request.
Warm-up: W1 as in the shared code; W2 one prompt (llama.cpp compiles nothing and has no
shape-dependent warm-up; the whole W2 twice would add minutes); W3 the whole workload.

.peers/llama/bin/python benchmarks/bench_peers.py WORKLOADS.json --gguf bf16=PATH --gguf q4_1=PATH
    [--json OUT.json] [--only w1,w2,w3]
"""

from __future__ import annotations

import argparse
import os

import llama_cpp
from peers_workloads import add_only_argument, figures, load, report, save, selected


def generate(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int) -> list[int]:
    """Exactly `new_tokens` greedy tokens after `prompt`, reusing the KV of the common prefix."""
    out: list[int] = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(tok)
        if len(out) == new_tokens:
            break
    return out


def bench(path: str, work: dict, threads: int, names: list[str]) -> dict:
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False
    )

    def run(prompts: list[list[int]], n: int) -> list[list[int]]:
        return [generate(llm, p, n) for p in prompts]

    return figures(names, lambda ids, n: generate(llm, ids, n), run, llm.reset, work, w2_warmup_prompts=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workloads")
    parser.add_argument("--gguf", action="append", default=[], help="NAME=PATH; repeatable")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    add_only_argument(parser)
    args = parser.parse_args()
    work, names = load(args.workloads), selected(args.only)
    rows = {}
    print(f"llama-cpp-python {llama_cpp.__version__}, {args.threads} threads", flush=True)
    for spec in args.gguf:
        name, path = spec.split("=", 1)
        if not os.path.exists(path):
            raise SystemExit(f"llama.cpp {name}: missing {path}")
        r = bench(path, work, args.threads, names)
        r["version"] = llama_cpp.__version__
        rows[f"llama.cpp {name}"] = r
        report(f"llama.cpp {name}", r)
        # after each GGUF: a later one that kills the process (llama.cpp's Q4_1 code died of SIGILL
        # on the 2026-12-06 Xeon VM) leaves the earlier rows for the table
        save(args.json, rows)


if __name__ == "__main__":
    main()
