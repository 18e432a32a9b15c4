"""`make bench`: every workload in one invocation, research_rt next to transformers, a table and a plot.

Ratios are only meaningful within one run on one quiet machine: the table prints them next to the
raw figures. Results are written to benchmarks/out/results.json and benchmarks/out/bench.png; copy
the table into benchmarks/RESULTS.md with the command and machine when it changes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).parent / "out"


def run(module: str, *args: str) -> dict:
    path = OUT / f"{module.rsplit('.', 1)[-1]}.json"
    cmd = [sys.executable, "-m", module, *args, "--json", str(path)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return json.loads(path.read_text())


def main() -> None:
    OUT.mkdir(exist_ok=True)
    single = run(
        "benchmarks.bench_single_stream",
        "--configs",
        os.environ.get(
            "BENCH_CONFIGS", "eager-bf16,compile-bf16,compile-fp32,compile-bf16-int8wo,compile-bf16-int4wo"
        ),
    )
    latency = run("benchmarks.bench_latency", "--batch-sizes", "1,4,16,64")
    offline = run("benchmarks.bench_offline", "--dtype", "bfloat16", "--compile")
    serving = run(
        "benchmarks.bench_serving",
        "--num-prompts",
        "32",
        "--rate",
        "2",
        "--new-tokens",
        "64",
        "--server-args=--enable-torch-compile",
    )
    grammar = run("benchmarks.bench_grammar", "--batch-sizes", "1,8")
    interventions = run("benchmarks.bench_interventions")
    speculative = run("benchmarks.bench_speculative")
    results = {
        "single_stream_tok_s": single,
        "latency": latency,
        "offline": offline,
        "serving": serving,
        "grammar": grammar,
        "interventions": interventions,
        "speculative": speculative,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=2))

    hf_single = max(v for k, v in single.items() if k.startswith("transformers"))
    ours_tp = next(v for k, v in offline.items() if k.startswith("research_rt"))
    hf_tp = offline.get("transformers bf16 batch16", float("nan"))
    on, off = offline["shared prefix seconds radix=on"], offline["shared prefix seconds radix=off"]
    lines = [
        "| workload | research_rt | baseline | ratio |",
        "|---|---|---|---|",
        *(
            f"| single stream, 128 tokens, {name.split(' ', 1)[1]} (tok/s) | {tps:.1f} | "
            f"transformers best {hf_single:.1f} | {tps / hf_single:.2f}x |"
            for name, tps in single.items()
            if name.startswith("research_rt")
        ),
        *(
            f"| batch {bs[3:]} x 256-token prompts: prefill / decode step (ms) | "
            f"{ours['prefill_ms']:.0f} / {ours['decode_step_ms']:.1f} | transformers "
            f"{hf['prefill_ms']:.0f} / {hf['decode_step_ms']:.1f} | "
            f"{hf['prefill_ms'] / ours['prefill_ms']:.2f}x / {hf['decode_step_ms'] / ours['decode_step_ms']:.2f}x |"
            for bs, ours in latency["research_rt"].items()
            if (hf := latency.get("transformers", {}).get(bs))
        ),
        f"| 64 prompts x 128 tokens (tok/s) | {ours_tp:.1f} | transformers bf16 batch 16 {hf_tp:.1f} | {ours_tp / hf_tp:.2f}x |",
        f"| 32 x shared 1024-token prefix (s) | {on:.2f} (radix on) | {off:.2f} (radix off) | {off / on:.2f}x |",
        f"| HTTP 32 req @2/s: TTFT p50 / p99 | {serving['ttft_p50_s']:.2f} s / {serving['ttft_p99_s']:.2f} s | | |",
        f"| HTTP 32 req @2/s: ITL p50 / p99 | {serving['itl_p50_ms']:.1f} ms / {serving['itl_p99_ms']:.0f} ms | | |",
    ]
    for row in grammar:
        if row["mode"] != "unconstrained":
            lines.append(
                f"| grammar {row['mode']} (batch {row['batch']}): mask cost per step | "
                f"{row['mask_ms_per_step']:.2f} ms | | |"
            )
    iv = interventions
    lines += [
        "| interventions, 1 stream (tok/s): plain / capture last / capture all / steer / ablate | "
        + " / ".join(
            f"{iv[f'{k} (tok/s)']:.1f}" for k in ("plain", "capture last", "capture all", "steer", "ablate")
        )
        + f" | plain eager {iv['plain eager (tok/s)']:.1f}, interventions off {iv['plain, interventions off (tok/s)']:.1f}"
        + f" | steer +{iv['steer: extra ms per token vs compiled']:.1f} ms/token |",
        f"| interventions, batch 8 (tok/s): plain / one request steers | {iv['batch 8 plain (tok/s)']:.1f} / "
        f"{iv['batch 8, one steers (tok/s)']:.1f} | | |",
    ]
    lines += [
        f"| n-gram speculation, 1 stream, {name} (tok/s) | {row['on tok/s']:.1f} (accept length "
        f"{row['spec_accept_length']:.2f}) | speculation off {row['off tok/s']:.1f} | {row['speedup']:.2f}x |"
        for name, row in speculative.items()
    ]
    print("\n".join(lines))
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(16, 4))
        names = list(single)
        axes[0].barh(
            names, [single[n] for n in names], color=["C0" if "research" in n else "C7" for n in names]
        )
        axes[0].set_xlabel("single-stream decode, tok/s")
        labels = ["research_rt (radix on)", "research_rt (radix off)"]
        axes[1].barh(labels, [on, off], color=["C0", "C1"])
        axes[1].set_xlabel("32 requests sharing a 1024-token prefix, seconds")
        for name, rows in latency.items():
            sizes = [int(k[3:]) for k in rows]
            axes[2].plot(sizes, [r["decode_step_ms"] for r in rows.values()], "o-", label=name)
        axes[2].set_xscale("log", base=2)
        axes[2].set_xlabel("batch size")
        axes[2].set_ylabel("decode step (ms), 256-token prompts")
        axes[2].legend()
        fig.tight_layout()
        fig.savefig(OUT / "bench.png", dpi=120)
        print(f"plot: {OUT / 'bench.png'}")
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
