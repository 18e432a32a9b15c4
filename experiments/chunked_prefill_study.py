"""Experiment: how --chunked-prefill-size trades time to first token (TTFT) against inter-token latency (ITL).

A seeded Poisson stream of requests (a mix of long and short prompts of random token ids, each generating
--new-tokens greedily with ignore_eos) runs through the offline Engine's streaming `async_generate` in one
asyncio loop, once per chunk size, each on a fresh Engine with otherwise identical arguments. Per size:
TTFT and ITL p50/p99, output throughput, and the scheduler's prefill/decode step counts.

Each size runs twice: without and with --enable-mixed-chunk. Without it a step is one forward,
either a prefill batch of at most chunk-size tokens or a decode of every running request, and prefill
goes first (a chunked request continues on the next step), so a smaller chunk bounds the length of
one forward but not how long running decodes wait for a long prompt. With it the running requests
decode inside every prefill forward, so a decode waits at most one chunk: the chunk size then sets
the inter-token latency under load, traded against prefill efficiency (TTFT).

    .venv/bin/python -m experiments.chunked_prefill_study                  # full study -> experiments/out/
    .venv/bin/python -m experiments.chunked_prefill_study --quick          # smoke run, about a minute
    .venv/bin/python -m experiments.chunked_prefill_study --chunk-sizes 128 512 --mixed on
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from research_rt import Engine
from research_rt.frontend.generate_input import GenerateInput

OUT_DIR = Path(__file__).resolve().parent / "out"


@dataclass(frozen=True)
class Workload:
    num_requests: int = 48
    rate: float = 1.0  # requests/s (Poisson); <= 0: all arrive at once
    long_frac: float = 0.25
    long_len: tuple[int, int] = (512, 1024)
    short_len: tuple[int, int] = (32, 128)
    new_tokens: int = 64
    seed: int = 0

    def requests(self, vocab_size: int) -> list[tuple[float, list[int]]]:
        """(arrival offset in s, prompt ids) per request. Random ids: prompts share no prefix (no cache hits)."""
        rng = random.Random(self.seed)
        low, t, out = min(1000, vocab_size // 2), 0.0, []  # skip the low ids (special tokens)
        for _ in range(self.num_requests):
            lo, hi = self.long_len if rng.random() < self.long_frac else self.short_len
            out.append((t, [rng.randrange(low, vocab_size) for _ in range(rng.randint(lo, hi))]))
            t += rng.expovariate(self.rate) if self.rate > 0 else 0.0
        return out


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(xs, p)) if xs else float("nan")


async def one_request(engine: Engine, arrival: float, ids: list[int], new_tokens: int, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    obj = GenerateInput(input_ids=ids, sampling_params=params, stream=True)
    sent, stamps = time.perf_counter(), []
    async for event in engine.async_generate(obj):  # cumulative outputs: count the new tokens
        n = event.response["meta_info"]["completion_tokens"]
        stamps += [time.perf_counter()] * (n - len(stamps))  # >1 new token in one event: ITL 0 for the rest
    return {
        "prompt_len": len(ids),
        "ttft": stamps[0] - sent,
        "itl": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens": len(stamps),
        "end": stamps[-1],
    }


async def drive(engine: Engine, reqs: list[tuple[float, list[int]]], new_tokens: int) -> tuple[list, float]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_request(engine, a, ids, new_tokens, t0) for a, ids in reqs))
    return list(results), max(r["end"] for r in results) - t0


def count_steps(engine: Engine) -> dict[str, int]:
    """From now on, count the scheduler's prefill and decode steps (a step hook, run on its thread)."""
    counts = {"prefill_steps": 0, "decode_steps": 0, "prefill_tokens": 0}
    last: dict[str, int] = {}

    def hook(s: Any) -> None:
        decoded = s.counters.decode_steps - last["d"]
        counts["decode_steps" if decoded else "prefill_steps"] += decoded or 1
        counts["prefill_tokens"] += s.counters.num_prefill_tokens - last["p"]
        last["d"], last["p"] = s.counters.decode_steps, s.counters.num_prefill_tokens

    def install() -> None:
        last["d"], last["p"] = (
            engine.scheduler.counters.decode_steps,
            engine.scheduler.counters.num_prefill_tokens,
        )
        engine.scheduler.step_hooks.append(hook)

    engine.call_in_scheduler(install)
    return counts


def run_config(
    chunk: int, workload: Workload, model_path: str | None = None, **engine_kwargs: Any
) -> dict[str, Any]:
    """One fresh Engine with `chunked_prefill_size=chunk`: warm up, run the workload, return its metrics."""
    # the decode step compiled before the run (by default an Engine serves eagerly while it compiles in
    # the background: the measured run would overlap a ~50 s compile and its eager steps)
    kwargs = {"dtype": "bfloat16", "random_seed": 0, "disable_background_compile": True, **engine_kwargs}
    engine = Engine(model_path, chunked_prefill_size=chunk, **kwargs)
    try:
        reqs = workload.requests(engine.config.vocab_size)
        longest = max((ids for _, ids in reqs), key=len)
        # Warm-up (runs the batch-2 and batch-1 decode graphs once), then
        # drop its KV from the prefix cache so the measured run starts cold.
        warm = {"ignore_eos": True}
        engine.generate(
            input_ids=[longest, longest[:16]],
            sampling_params=[{**warm, "max_new_tokens": 4}, {**warm, "max_new_tokens": 8}],
        )
        if not engine.flush_cache():
            raise RuntimeError("the scheduler did not flush its cache after the warm-up")
        counts = count_steps(engine)
        results, elapsed = asyncio.run(drive(engine, reqs, workload.new_tokens))
        counts = engine.call_in_scheduler(lambda: dict(counts))  # after the last step's hook ran
    finally:
        engine.shutdown()
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    is_long = [r["prompt_len"] >= workload.long_len[0] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "chunked_prefill_size": chunk,
        "enable_mixed_chunk": bool(engine_kwargs.get("enable_mixed_chunk")),
        "requests": len(results),
        "output_tokens": tokens,
        "elapsed_s": elapsed,
        "output_throughput_tok_s": tokens / elapsed,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "ttft_long_p50_s": pct([t for t, lg in zip(ttft, is_long) if lg], 50),
        "ttft_short_p50_s": pct([t for t, lg in zip(ttft, is_long) if not lg], 50),
        "itl_p50_ms": 1000 * pct(itl, 50),
        "itl_p99_ms": 1000 * pct(itl, 99),
        "itl_max_ms": 1000 * max(itl, default=float("nan")),
        "num_itl": len(itl),
        **counts,
    }


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = [("ttft", "s", "TTFT (s)"), ("itl", "ms", "inter-token latency (ms)")]
    for mixed, color in ((False, "C0"), (True, "C1")):
        sel = [r for r in rows if r["enable_mixed_chunk"] == mixed]
        if not sel:
            continue
        xs, tag = [r["chunked_prefill_size"] for r in sel], "mixed" if mixed else "prefill-first"
        for ax, (key, unit, label) in zip(axes, panels):
            ax.plot(xs, [r[f"{key}_p50_{unit}"] for r in sel], "o-", color=color, label=f"{tag} p50")
            ax.plot(xs, [r[f"{key}_p99_{unit}"] for r in sel], "s--", color=color, label=f"{tag} p99")
            ax.set_ylabel(label)
        axes[2].plot(xs, [r["output_throughput_tok_s"] for r in sel], "o-", color=color, label=tag)
    axes[2].set_ylabel("output throughput (tok/s)")
    sizes = sorted({r["chunked_prefill_size"] for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(x) for x in sizes])
        ax.minorticks_off()
        ax.set_xlabel("--chunked-prefill-size (tokens)")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].legend()
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--chunk-sizes", type=int, nargs="+", help="default: 64 128 256 512 1024 (--quick: 32 256)"
    )
    p.add_argument("--num-requests", type=int, default=Workload.num_requests)
    p.add_argument("--rate", type=float, default=Workload.rate, help="requests/s (Poisson)")
    p.add_argument("--long-frac", type=float, default=Workload.long_frac)
    p.add_argument("--new-tokens", type=int, default=Workload.new_tokens)
    p.add_argument("--seed", type=int, default=Workload.seed)
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--disable-torch-compile", action="store_true")
    p.add_argument("--mixed", choices=("off", "on", "both"), default="both", help="--enable-mixed-chunk")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 chunk sizes, 6 small requests")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    a = p.parse_args()
    fields = dict(num_requests=a.num_requests, rate=a.rate, long_frac=a.long_frac, new_tokens=a.new_tokens)
    if a.quick:
        fields = dict(
            num_requests=6, rate=4.0, long_frac=0.5, long_len=(128, 256), short_len=(8, 32), new_tokens=8
        )
    workload = Workload(seed=a.seed, **fields)
    chunk_sizes = a.chunk_sizes or ([32, 256] if a.quick else [128, 256, 512, 1024, 2048])
    name = "chunked_prefill_study" + ("_quick" if a.quick else "")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"dtype": a.dtype, "enable_torch_compile": not a.disable_torch_compile}
    meta = {"model_path": a.model_path, **engine_kwargs, "workload": asdict(workload)}
    modes = {"off": [False], "on": [True], "both": [False, True]}[a.mixed]
    rows: list[dict[str, Any]] = []
    print(
        f"{'mixed':>5} {'chunk':>6} {'TTFT p50/p99 (s)':>17} {'ITL p50/p99 (ms)':>17} {'tok/s':>7} {'prefill steps':>13}"
    )
    for mixed, chunk in [(m, c) for m in modes for c in sorted(chunk_sizes)]:
        r = run_config(chunk, workload, a.model_path, **engine_kwargs, enable_mixed_chunk=mixed)
        rows.append(r)
        print(
            f"{'on' if mixed else 'off':>5} {chunk:>6} {r['ttft_p50_s']:>8.3f}/{r['ttft_p99_s']:<8.3f} {r['itl_p50_ms']:>8.1f}/"
            f"{r['itl_p99_ms']:<8.1f} {r['output_throughput_tok_s']:>7.1f} {r['prefill_steps']:>13}",
            flush=True,
        )
        (a.out_dir / f"{name}.json").write_text(json.dumps({**meta, "results": rows}, indent=2))
    w, compiled = workload, "" if a.disable_torch_compile else " compiled"
    (l0, l1), (s0, s1) = w.long_len, w.short_len
    title = (
        f"{a.model_path or 'SmolLM2-135M-Instruct'} {a.dtype}{compiled}: {w.num_requests} requests at "
        f"{w.rate}/s, {w.long_frac:.0%} of {l0}-{l1} tokens, else {s0}-{s1}; {w.new_tokens} new each"
    )
    plot(rows, title, a.out_dir / f"{name}.png")
    print(f"wrote {a.out_dir / name}.json and .png")


if __name__ == "__main__":
    main()
