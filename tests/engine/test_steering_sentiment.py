"""experiments/steering_sentiment.py, small: on the tiny Llama (SmolLM2's tokenizer, random weights)
the pipeline runs end to end, scale-0 rows are the plain generations, and the steered activations
move along the direction by exactly scale x |direction|."""

from __future__ import annotations

import json

import numpy as np

from experiments.steering_sentiment import PROMPTS, lexicon_score, plot, run
from tests.conftest import eager_engine


def test_steering_experiment_small(tiny_llama_dir, tmp_path):
    prompts = PROMPTS[:2]
    results = run(str(tiny_llama_dir), layer=1, scales=(-4, 0, 4), prompts=prompts, max_new_tokens=4)
    assert len(results["direction"]) == 64 and 0 <= results["held_out_accuracy"] <= 1
    train = results["train_projection"]
    # a difference of means separates its own training means by |direction| along its unit vector
    gap = np.mean(train["positive"]) - np.mean(train["negative"])
    assert np.isclose(gap, results["direction_norm"], rtol=1e-4)
    summary = {float(s): row for s, row in results["summary"].items()}
    for s in (-4, 4):  # steering at resid_post shifts that site's projection by s * |direction|
        shift = summary[s]["steered_projection"] - summary[0]["steered_projection"]
        assert np.isclose(shift, s * results["direction_norm"], rtol=1e-3)
    for row in results["scales"].values():
        assert len(row["texts"]) == len(row["judge"]) == len(row["lexicon"]) == len(prompts)
        assert all(np.isfinite(row["judge"]))
    with eager_engine(str(tiny_llama_dir), dtype="float32") as engine:
        plain = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 4, "repetition_penalty": 1.2})
    assert results["scales"]["0"]["texts"] == [o["text"] for o in plain]
    json.dumps(results)  # what main() writes
    plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_lexicon_score():
    assert lexicon_score("A wonderful, LOVELY day!") == 2
    assert lexicon_score("It was awful. Truly awful; but the soup was good.") == -1
