"""Per-token cost of grammar constraints on SmolLM2-135M-Instruct: unconstrained vs json_schema vs regex.

.venv/bin/python -m benchmarks.bench_grammar [--batch-sizes 1,8] [--new-tokens 96] [--json out.json]

Every row samples at temperature 1 from the same chat prompt in the same Engine. A constrained
request stops when its grammar completes, so rows report generated tokens per second of wall time
(decode throughput) and the mask time the sampler spent per step (fill the bitmask from the
matcher + apply it to the logits), timed around `apply_grammar_masks`. The "mixed" row runs one
json_schema request among unconstrained ones: their throughput should only pay the mask cost.
"""

from __future__ import annotations

import argparse
import json
import time

import research_rt.sampling.sampler as sampler_mod
from benchmarks.common import timed

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 6},
        "city": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "age", "hobbies", "city"],
    "additionalProperties": False,
}
REGEX = r"(\+1 \(\d{3}\) \d{3}-\d{4}\n){1,12}"


class MaskTimer:
    """Wraps the sampler's `apply_grammar_masks` to add up the time spent masking."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self._orig = sampler_mod.apply_grammar_masks

    def __enter__(self) -> MaskTimer:
        def timed_apply(*a, **k):
            t0 = time.perf_counter()
            self._orig(*a, **k)
            self.seconds += time.perf_counter() - t0
            self.calls += 1

        sampler_mod.apply_grammar_masks = timed_apply
        return self

    def __exit__(self, *exc) -> None:
        sampler_mod.apply_grammar_masks = self._orig


def run(engine, prompt: str, params: list[dict]) -> tuple[float, int, int, MaskTimer]:
    with MaskTimer() as mt:
        dt, outs = timed(lambda: engine.generate([prompt] * len(params), params))
    return dt, sum(o["meta_info"]["completion_tokens"] for o in outs), len(outs), mt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import research_rt

    engine = research_rt.Engine(random_seed=0, disable_background_compile=True)
    tok = engine.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Write a person record as JSON, or a list of phone numbers."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    base = {"temperature": 1.0, "max_new_tokens": args.new_tokens}
    modes = {
        "unconstrained": {"ignore_eos": True},
        "json_schema": {"json_schema": json.dumps(SCHEMA)},
        "regex": {"regex": REGEX},
    }
    engine.generate(prompt, {**base, **modes["json_schema"], "max_new_tokens": 8})  # compile + warm up
    rows = []
    print(f"{'mode':28s} {'batch':>5s} {'tokens':>7s} {'tok/s':>8s} {'ms/token':>9s} {'mask ms/step':>13s}")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        cases = [
            (name, [{**base, **extra, "sampling_seed": s} for s in range(bs)])
            for name, extra in modes.items()
        ]
        if bs > 1:
            mixed = [{**base, **modes["json_schema"], "sampling_seed": 0}]
            mixed += [{**base, **modes["unconstrained"], "sampling_seed": s} for s in range(1, bs)]
            cases.append(("mixed (1 json + rest free)", mixed))
        for name, params in cases:
            best = None
            for _ in range(args.repeats):
                dt, tokens, _, mt = run(engine, prompt, params)
                if best is None or tokens / dt > best[1] / best[0]:
                    best = (dt, tokens, mt)
            dt, tokens, mt = best
            mask_ms = 1000 * mt.seconds / mt.calls if mt.calls else 0.0
            row = {
                "mode": name,
                "batch": len(params),
                "tokens": tokens,
                "tokens_per_s": tokens / dt,
                "ms_per_token_step": 1000 * dt / (tokens / len(params)),
                "mask_ms_per_step": mask_ms,
            }
            rows.append(row)
            print(
                f"{name:28s} {row['batch']:5d} {tokens:7d} {row['tokens_per_s']:8.1f} "
                f"{row['ms_per_token_step']:9.2f} {mask_ms:13.3f}",
                flush=True,
            )
    engine.shutdown()
    print("ms/token = wall time per decode step of the batch (lower is better); prefill included.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
