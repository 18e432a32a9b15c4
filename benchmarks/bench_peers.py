"""Single-stream greedy decode on llama.cpp (llama-cpp-python), the peer of bench_single_stream.py.

Runs with the llama venv's python (`make bench-peers` sets it up under .peers/llama); does not import
research_rt or torch. Same workload as research_rt's single-stream bench: the STORY prompt of
benchmarks/common.py (read from that file), 128 new tokens, greedy, EOS ignored, 2 threads.

.peers/llama/bin/python benchmarks/bench_peers.py --gguf bf16=PATH --gguf q4_1=PATH [--json PATH]

Per GGUF: best of 3 runs (after one warm-up). Two figures per run:
  decode tok/s      tokens 2..N over the time from the first token to the last (no prompt processing)
  end-to-end tok/s  N tokens over the whole call, prompt processing included; this is what
                    bench_single_stream.py reports for research_rt (new_tokens / generate time)
The timed runs repeat the prompt, so llama-cpp-python's `generate` reuses its cached prefix (it
re-evaluates the last prompt token only), as research_rt's radix cache does in bench_single_stream.py;
the two figures then differ by about one step.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import time
from pathlib import Path

import llama_cpp


def story_prompt() -> str:
    """STORY from benchmarks/common.py, read without importing it (it imports torch)."""
    tree = ast.parse((Path(__file__).parent / "common.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "STORY" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("STORY not found in benchmarks/common.py")


def run_once(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """One greedy generation of exactly `new_tokens` (EOS is not a stop: `generate` never stops itself)."""
    out: list[int] = []
    t0 = time.perf_counter()
    t_first = t0
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(tok)
        if len(out) == 1:
            t_first = time.perf_counter()
        if len(out) == new_tokens:
            break
    t_end = time.perf_counter()
    decode = (new_tokens - 1) / (t_end - t_first)
    return decode, new_tokens / (t_end - t0), out


def bench(path: str, prompt_text: str, new_tokens: int, runs: int, threads: int) -> dict:
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False
    )
    prompt = llm.tokenize(prompt_text.encode(), add_bos=False, special=True)
    run_once(llm, prompt, new_tokens)  # warm-up
    results = [run_once(llm, prompt, new_tokens) for _ in range(runs)]
    text = llm.detokenize(results[0][2]).decode(errors="replace")
    del llm
    return {
        "decode_tok_s": max(r[0] for r in results),
        "end_to_end_tok_s": max(r[1] for r in results),
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "text_head": text[:80],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", action="append", default=[], help="NAME=PATH; repeatable")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    prompt = story_prompt()
    rows = {}
    print(f"llama-cpp-python {llama_cpp.__version__}, {args.threads} threads, {args.new_tokens} new tokens")
    print(f"{'llama.cpp':16s} {'decode tok/s':>13s} {'end-to-end tok/s':>17s}")
    for spec in args.gguf:
        name, path = spec.split("=", 1)
        if not os.path.exists(path):
            print(f"llama.cpp {name:6s} missing: {path}")
            continue
        r = bench(path, prompt, args.new_tokens, args.runs, args.threads)
        rows[f"llama.cpp {name}"] = r
        print(f"llama.cpp {name:6s} {r['decode_tok_s']:13.1f} {r['end_to_end_tok_s']:17.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
