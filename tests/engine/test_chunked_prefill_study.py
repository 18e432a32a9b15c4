"""experiments/chunked_prefill_study.py: `run_config` on the tiny Llama stamps every token and chunks the prefill."""

from __future__ import annotations

from experiments.chunked_prefill_study import Workload, run_config


def test_run_config_counts_every_token_and_chunks_prefill(tiny_llama_dir):
    w = Workload(
        num_requests=5, rate=0.0, long_frac=0.6, long_len=(150, 250), short_len=(4, 16), new_tokens=6, seed=1
    )
    prompts = [ids for _, ids in w.requests(49152)]  # the tiny Llama has SmolLM2's vocabulary
    assert len({ids[0] for ids in prompts}) == len(prompts)  # no shared prefix: no cache hits
    prompt_tokens = sum(map(len, prompts))
    results = {c: run_config(c, w, str(tiny_llama_dir), dtype="float32") for c in (16, 512)}
    for chunk, r in results.items():
        assert r["requests"] == 5 and r["output_tokens"] == 5 * 6 and r["num_itl"] == 5 * 5
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 <= r["itl_p50_ms"] <= r["itl_p99_ms"]
        assert r["output_throughput_tok_s"] > 0
        assert r["prefill_tokens"] == prompt_tokens  # the warm-up's KV was flushed: all prefilled once
        assert r["prefill_steps"] >= -(-prompt_tokens // chunk)  # at most `chunk` tokens a step
        assert r["decode_steps"] >= w.new_tokens - 1
    assert results[16]["prefill_steps"] > results[512]["prefill_steps"]
