"""The three `make bench-peers` workloads as token ids, written once to JSON for every engine.

research_rt builds the prompts (its tokenizer, fixed seeds, the same functions `make bench` uses), and
the peers' scripts, which run in their own venvs without research_rt, read the ids from the file, so
every engine gets exactly the same tokens:

  w1  single stream: the STORY chat prompt (benchmarks/common.py), 128 new tokens
  w2  throughput: 64 prompts of 32-512 tokens (`random_prompts(tok, 64, 32, 512, seed=0)`, as in
      bench_offline.py), 128 new tokens each, all submitted at once
  w3  shared prefix: 32 prompts = one 1024-token prefix + 32-token suffixes (`shared_prefix_prompts()`,
      as in bench_offline.py), 32 new tokens each

Greedy, EOS ignored, everywhere. `make bench-peers` runs the workloads one at a time, each on every
engine in turn (`--only`), so the engines a target compares run minutes apart rather than a quarter of
an hour (this VM's speed drifts by up to a third over that); peers_table.py joins the figures.
Everything below `build()` uses only the standard library, so the peers' scripts import this file too
and every engine is timed by the same code:
  W1: best of `runs` (after a warm-up) of a 1-token and an N-token generation of the same prompt (its
      prefix cached by then in every engine): end-to-end tok/s = N / t(N), decode tok/s =
      (N - 1) / (t(N) - t(1)), i.e. the prompt and first token taken out.
  W2, W3: one warm-up run of the whole workload, then the engine's caches are emptied (`reset`) and
      one timed run; the figure is its wall time (and generated tokens / wall time).

.venv/bin/python -m benchmarks.peers_workloads OUT.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable


def build() -> dict:
    from benchmarks.common import STORY, random_prompts, shared_prefix_prompts
    from research_rt.loader.model_loader import load_tokenizer
    from research_rt.loader.resolve import resolve_model_path

    tok = load_tokenizer(resolve_model_path(None))
    return {
        "w1": {"prompts": [tok.encode(STORY)], "new_tokens": 128},
        "w2": {"prompts": random_prompts(tok, 64, 32, 512, seed=0), "new_tokens": 128},
        "w3": {"prompts": shared_prefix_prompts(), "new_tokens": 32},
    }


WORKLOADS = ("w1", "w2", "w3")


def add_only_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads to run")


def selected(only: str) -> list[str]:
    names = [w for w in only.split(",") if w]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown or not names:
        raise SystemExit(f"--only takes a comma-separated subset of {','.join(WORKLOADS)}, got {only!r}")
    return [w for w in WORKLOADS if w in names]


def figures(
    names: list[str],
    generate: Callable[[list[int], int], list[int]],
    run: Callable[[list[list[int]], int], list[list[int]]],
    reset: Callable[[], None],
    work: dict,
    w2_warmup_prompts: int | None = None,
) -> dict:
    """The figures of the `names` workloads: W1 through `generate`, W2 and W3 through `run`."""
    row: dict = {}
    for name in names:
        if name == "w1":
            row |= w1_figures(generate, work)
        else:
            warmup = w2_warmup_prompts if name == "w2" else None
            row |= batch_figures(name, run, reset, work, warmup_prompts=warmup)
    return row


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def w1_figures(generate: Callable[[list[int], int], list[int]], work: dict, runs: int = 3) -> dict:
    """`generate(prompt_ids, n)` -> the n greedy output ids; W1's decode and end-to-end tok/s."""
    prompt, n = work["w1"]["prompts"][0], work["w1"]["new_tokens"]
    generate(prompt, n)  # warm-up
    t_one, t_all, ids = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        generate(prompt, 1)
        t_one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ids = generate(prompt, n)
        t_all.append(time.perf_counter() - t0)
    assert len(ids) == n, f"W1 generated {len(ids)} tokens, expected {n}"
    return {
        "w1_decode_tok_s": (n - 1) / (min(t_all) - min(t_one)),
        "w1_e2e_tok_s": n / min(t_all),
        "w1_ids": ids[:16],
    }


def batch_figures(
    name: str,
    run: Callable[[list[list[int]], int], list[list[int]]],
    reset: Callable[[], None],
    work: dict,
    warmup_prompts: int | None = None,
) -> dict:
    """`run(prompts, n)` -> each prompt's n output ids; wall time of one run after a warm-up (the
    first `warmup_prompts` prompts, default all) and `reset()`."""
    prompts, n = work[name]["prompts"], work[name]["new_tokens"]
    run(prompts[:warmup_prompts], n)
    reset()
    t0 = time.perf_counter()
    outs = run(prompts, n)
    elapsed = time.perf_counter() - t0
    total = sum(len(o) for o in outs)
    assert total == n * len(prompts), f"{name} generated {total} tokens, expected {n * len(prompts)}"
    return {f"{name}_s": elapsed, f"{name}_tok_s": total / elapsed, f"{name}_ids0": outs[0][:8]}


def report(name: str, row: dict) -> None:
    """One engine's figures (those it ran) on one line, as every peer script prints them."""
    parts = []
    if "w1_decode_tok_s" in row:
        parts.append(f"W1 {row['w1_decode_tok_s']:.1f} / {row['w1_e2e_tok_s']:.1f} tok/s")
    parts += [f"{w.upper()} {row[f'{w}_s']:.2f} s" for w in ("w2", "w3") if f"{w}_s" in row]
    print(f"{name}: " + ", ".join(parts), flush=True)


def save(path: str | None, rows: dict[str, dict]) -> None:
    """Write {engine: figures} for benchmarks/peers_table.py (nothing without a path)."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    args = parser.parse_args()
    work = build()
    with open(args.out, "w") as f:
        json.dump(work, f)
    sizes = {k: (len(v["prompts"]), sum(map(len, v["prompts"]))) for k, v in work.items()}
    print(f"wrote {args.out}: " + ", ".join(f"{k} {n} prompts / {t} tokens" for k, (n, t) in sizes.items()))


if __name__ == "__main__":
    main()
