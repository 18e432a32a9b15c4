"""What an intervention costs per generated token: SmolLM2, bfloat16, greedy, 128 tokens.

A request with interventions runs its decode steps eager (the compiled step serves only batches
without them), so its cost per token is the eager step plus the hooks' own work. Measured on one
Engine (compiled decode, --enable-interventions): plain requests (compiled path), then the same
request capturing layer 10's resid_post (last position / every position), steering it, and
ablating 3 heads and 512 MLP neurons of layer 10; a batch of 8 plain requests against the same
batch where one request steers (the whole batch then decodes eager). A second Engine without
--enable-interventions checks that the plain compiled path is unchanged.

    .venv/bin/python -m benchmarks.bench_interventions [--new-tokens 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from benchmarks.common import STORY, timed

LAYER = 10


def cases(hidden: int) -> dict[str, dict[str, Any]]:
    vector = [0.01] * hidden
    return {
        "plain": {},
        "capture last": {"capture": {"layers": [LAYER], "positions": "last"}},
        "capture all": {"capture": {"layers": [LAYER], "positions": "all"}},
        "steer": {"steer": [{"layer": LAYER, "vector": vector, "scale": 1.0}]},
        "ablate": {
            "ablate": [{"layer": LAYER, "heads": [0, 1, 2]}, {"layer": LAYER, "neurons": list(range(512))}]
        },
    }


def tokens_per_s(engine, params: dict, batch: int = 1, **fields: Any) -> float:
    prompts = STORY if batch == 1 else [STORY] * batch
    engine.generate(prompts, {**params, "max_new_tokens": 4}, **fields)  # warm
    best = min(timed(lambda: engine.generate(prompts, params, **fields))[0] for _ in range(2))
    return batch * params["max_new_tokens"] / best


def main() -> None:
    import research_rt

    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    params = {"temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
    rows: dict[str, float] = {}
    common = dict(
        dtype="bfloat16", enable_torch_compile=True, disable_background_compile=True, max_total_tokens=8192
    )
    with research_rt.Engine(**common) as engine:
        rows["plain, interventions off (tok/s)"] = tokens_per_s(engine, params)
    with research_rt.Engine(enable_interventions=True, **common) as engine:
        hidden = engine.runner.intervention_shape.hidden_size
        for name, fields in cases(hidden).items():
            rows[f"{name} (tok/s)"] = tokens_per_s(engine, params, **fields)
            print(f"{name:14s} {rows[f'{name} (tok/s)']:7.1f} tok/s", flush=True)
        steer = cases(hidden)["steer"]["steer"]
        rows["batch 8 plain (tok/s)"] = tokens_per_s(engine, params, batch=8)
        rows["batch 8, one steers (tok/s)"] = tokens_per_s(
            engine, params, batch=8, steer=[steer] + [None] * 7
        )
    with research_rt.Engine(**{**common, "enable_torch_compile": False}) as engine:
        rows["plain eager (tok/s)"] = tokens_per_s(engine, params)
    plain_ms = 1000 / rows["plain (tok/s)"]
    for name in ("capture last", "capture all", "steer", "ablate"):
        rows[f"{name}: extra ms per token vs compiled"] = 1000 / rows[f"{name} (tok/s)"] - plain_ms
        rows[f"{name}: extra ms per token vs eager"] = (
            1000 / rows[f"{name} (tok/s)"] - 1000 / rows["plain eager (tok/s)"]
        )
    for k, v in rows.items():
        print(f"{k:45s} {v:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
