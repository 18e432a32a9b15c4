"""vLLM's CPU build on the three `make bench-peers` workloads, with its offline `LLM` API.

Runs with the vLLM venv's python (`make bench-peers` sets it up under .peers/vllm); does not import
research_rt. Reads the token ids of benchmarks/peers_workloads.py and is timed by that file's shared
code (W1: best of 3 after a warm-up; W2, W3: one run after a warm-up of the whole workload, the prefix
cache reset in between).

The model is an HF directory written by benchmarks/peers_hf_dir.py (the bundled GGUF dequantized to
bfloat16, the same weights research_rt runs). Settings, as vLLM's CPU docs advise: dtype bfloat16,
prefix caching on, KV cache space from VLLM_CPU_KVCACHE_SPACE (GiB), OpenMP threads bound to the
cores of VLLM_CPU_OMP_THREADS_BIND, libiomp5 (and tcmalloc where installed) in LD_PRELOAD (the
Makefile sets these), `max_num_seqs` 64 so W2's 64 prompts decode in one batch, and
`max_num_batched_tokens` 4096 (chunked prefill: prefill chunks of up to 4096 tokens a step).

.peers/vllm/bin/python benchmarks/bench_peers_vllm.py MODEL_DIR WORKLOADS.json [--json OUT.json] [--only w1,w2,w3]
"""

from __future__ import annotations

import argparse
import os

from peers_workloads import add_only_argument, figures, load, report, save, selected


def bench(model: str, work: dict, max_num_batched_tokens: int, names: list[str]) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model,
        dtype="bfloat16",
        enable_prefix_caching=True,
        max_model_len=2048,
        max_num_seqs=64,
        max_num_batched_tokens=max_num_batched_tokens,
        seed=0,
    )

    def run(prompts: list[list[int]], n: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def reset() -> None:
        assert llm.reset_prefix_cache(), "reset_prefix_cache refused"

    row = figures(names, lambda ids, n: run([ids], n)[0], run, reset, work)
    row["version"] = vllm.__version__
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("workloads")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--json", default=None)
    add_only_argument(parser)
    args = parser.parse_args()
    env = {
        k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")
    }
    print(f"vLLM environment: {env}", flush=True)
    row = bench(args.model, load(args.workloads), args.max_num_batched_tokens, selected(args.only))
    report(f"vLLM {row['version']} bf16", row)
    save(args.json, {"vLLM CPU bf16": row})


if __name__ == "__main__":  # vLLM's engine core starts by spawn: the entry point must be guarded
    main()
