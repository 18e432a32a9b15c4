"""One side-by-side table of the `make bench-peers` results, and research_rt against its targets.

Reads the JSON files that bench_peers_research_rt.py, bench_peers.py (llama.cpp) and
bench_peers_vllm.py wrote in the same invocation (standard library only), one per engine and workload
(`--only`): an engine's figures from several files are joined. A missing file is reported and its
figures left out ("-"). Targets (the issue's): W1 >= 1.3x llama.cpp BF16; W2 and W3 faster than vLLM.

python benchmarks/peers_table.py OUT/bench_peers_*.json [--md TABLE.md]
"""

from __future__ import annotations

import argparse
import json
import os

OURS = "research_rt compile-bf16"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def table(rows: dict[str, dict]) -> list[str]:
    ref = rows.get(OURS, {})
    lines = [
        "| engine | W1 decode tok/s | W1 end-to-end tok/s | W2 wall s (tok/s) | W3 wall s (tok/s) "
        "| first tokens = research_rt's (W1 / W2 #0 / W3 #0) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        same = " / ".join(
            f"{common_prefix(r[k], ref[k])}/{len(ref[k])}" if k in ref and k in r else "-"
            for k in ("w1_ids", "w2_ids0", "w3_ids0")
        )
        w1 = [f"{r[k]:.1f}" if k in r else "-" for k in ("w1_decode_tok_s", "w1_e2e_tok_s")]
        w2 = f"{r['w2_s']:.1f} ({r['w2_tok_s']:.0f})" if "w2_s" in r else "-"
        w3 = f"{r['w3_s']:.2f} ({r['w3_tok_s']:.0f})" if "w3_s" in r else "-"
        lines.append(f"| {name} | {w1[0]} | {w1[1]} | {w2} | {w3} | {same} |")
    return lines


def targets(rows: dict[str, dict]) -> list[str]:
    ours, llama, vllm = rows.get(OURS), rows.get("llama.cpp bf16"), rows.get("vLLM CPU bf16")
    if ours is None:
        return ["research_rt missing: no target check"]
    out = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if llama and "w1_decode_tok_s" in llama and "w1_decode_tok_s" in ours:
        d = ours["w1_decode_tok_s"] / llama["w1_decode_tok_s"]
        e = ours["w1_e2e_tok_s"] / llama["w1_e2e_tok_s"]
        out.append(
            f"W1 research_rt / llama.cpp BF16: decode {d:.2f}x, end-to-end {e:.2f}x "
            f"(target >= 1.3x: {verdict(min(d, e) >= 1.3)})"
        )
    q4, llama_q4 = rows.get(OURS + " int4wo-32"), rows.get("llama.cpp q4_1")
    if q4 and llama_q4 and "w1_decode_tok_s" in q4 and "w1_decode_tok_s" in llama_q4:
        out.append(
            f"W1 beside it, 4-bit (the GGUF's Q4_1 codes): research_rt int4wo-32 / llama.cpp Q4_1: decode "
            f"{q4['w1_decode_tok_s'] / llama_q4['w1_decode_tok_s']:.2f}x, end-to-end "
            f"{q4['w1_e2e_tok_s'] / llama_q4['w1_e2e_tok_s']:.2f}x; / llama.cpp BF16: decode "
            + (f"{q4['w1_decode_tok_s'] / llama['w1_decode_tok_s']:.2f}x" if llama else "-")
        )
    if vllm:
        for w in (w for w in ("w2", "w3") if f"{w}_s" in vllm and f"{w}_s" in ours):
            r = vllm[f"{w}_s"] / ours[f"{w}_s"]
            out.append(
                f"{w.upper()} research_rt {ours[f'{w}_s']:.2f} s vs vLLM {vllm[f'{w}_s']:.2f} s: "
                f"research_rt {r:.2f}x as fast (target > 1x: {verdict(r > 1)})"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+")
    parser.add_argument("--md", default=None)
    args = parser.parse_args()
    rows: dict[str, dict] = {}
    for path in args.files:
        if not os.path.exists(path):
            print(f"missing {path}: its figures are left out")
            continue
        with open(path) as f:
            for name, row in json.load(f).items():
                rows.setdefault(name, {}).update(row)
    lines = table(rows) + [""] + targets(rows)
    print("\n".join(lines))
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
