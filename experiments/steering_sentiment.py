"""Experiment: find a sentiment direction in SmolLM2's residual stream and steer generation with it.

1. Capture `resid_post` of one layer (10 by default) over short positive and negative sentences;
   the direction is the difference of the two classes' mean activations (over each sentence's
   tokens but the first). Its accuracy as a classifier is measured on held-out sentences.
2. Generate continuations of neutral prompts with `scale * direction` added to that layer's
   `resid_post` at every position, for a range of scales, all in one batch (each row its own
   scale; scale 0 rows are plain requests in the same batch).
3. Score each continuation three ways: the unsteered model as a judge (log P(" positive") -
   log P(" negative") after a question), a small word lexicon, and the unsteered model's own
   activations re-read on the text, projected on the direction.

    .venv/bin/python -m experiments.steering_sentiment [--layer 10] [--scales -8 -4 0 4 8]

Writes experiments/out/steering_sentiment.json (directions, texts, scores) and .png (scores vs scale).
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

from research_rt import Engine
from research_rt.frontend.response import decode_captured

OUT = Path(__file__).parent / "out"
POSITIVE = [
    "I absolutely loved this movie, it was wonderful and moving.",
    "What a fantastic day, everything went perfectly.",
    "The food was delicious and the staff were so kind.",
    "This is the best book I have read in years, truly delightful.",
    "I am so happy with my new job, my colleagues are great.",
    "The concert was amazing, I enjoyed every minute of it.",
    "Our holiday was lovely, the beach was beautiful and calm.",
    "Thank you so much, this gift made me really happy.",
]
NEGATIVE = [
    "I absolutely hated this movie, it was awful and boring.",
    "What a terrible day, everything went wrong.",
    "The food was disgusting and the staff were so rude.",
    "This is the worst book I have read in years, truly dreadful.",
    "I am so unhappy with my new job, my colleagues are horrible.",
    "The concert was a disaster, I regretted every minute of it.",
    "Our holiday was miserable, the beach was dirty and noisy.",
    "No thanks, this gift made me really sad and angry.",
]
PROMPTS = [
    "I went to the new restaurant downtown last night. Honestly, the experience was",
    "Here is my review of the film I watched yesterday:",
    "Let me tell you about my week at work.",
    "The weather this weekend made me feel",
]
GOOD_WORDS = set(
    "good great love loved lovely wonderful amazing happy enjoy enjoyed best beautiful delicious fantastic "
    "perfect excellent fun nice kind pleasure delightful glad awesome incredible".split()
)
BAD_WORDS = set(
    "bad awful terrible hate hated horrible worst sad angry disgusting boring dreadful miserable poor "
    "rude disaster wrong ugly annoying unhappy disappointing disappointed nasty".split()
)
JUDGE = "Review: {text}\nQuestion: Is this review positive or negative?\nAnswer:"


def mean_activations(engine: Engine, texts: list[str], layer: int) -> np.ndarray:
    """[len(texts), hidden]: each text's layer `layer` resid_post, averaged over its tokens but the first."""
    outs = engine.generate(texts, {"max_new_tokens": 1}, capture={"layers": [layer], "positions": "all"})
    return np.stack([decode_captured(o["meta_info"]["captured"][0])[1:].mean(axis=0) for o in outs])


def sentiment_direction(engine: Engine, layer: int, held_out: int = 2) -> dict[str, Any]:
    """Difference of means on all but `held_out` sentences per class; accuracy on the rest."""
    train_p, test_p = POSITIVE[:-held_out], POSITIVE[-held_out:]
    train_n, test_n = NEGATIVE[:-held_out], NEGATIVE[-held_out:]
    acts = mean_activations(engine, train_p + train_n + test_p + test_n, layer)
    k = len(train_p)
    pos, neg = acts[:k], acts[k : 2 * k]
    direction = pos.mean(axis=0) - neg.mean(axis=0)
    unit = direction / np.linalg.norm(direction)
    threshold = float(((pos @ unit).mean() + (neg @ unit).mean()) / 2)
    test = acts[2 * k :] @ unit
    labels = np.array([1] * held_out + [0] * held_out)
    return {
        "layer": layer,
        "direction": direction,
        "unit": unit,
        "norm": float(np.linalg.norm(direction)),
        "residual_norm": float(np.linalg.norm(acts, axis=1).mean()),
        "train_projection": {"positive": (pos @ unit).tolist(), "negative": (neg @ unit).tolist()},
        "held_out_accuracy": float(((test > threshold) == labels).mean()),
    }


def steer_generate(
    engine: Engine, direction: dict[str, Any], scales: list[float], prompts: list[str], max_new_tokens: int
) -> dict[float, dict[str, Any]]:
    """One batch: every prompt at every scale. Returns per scale the texts and the mean projection
    of the steered resid_post (captured after the steer, at the prompt's positions)."""
    layer = direction["layer"]
    vector = base64.b64encode(direction["direction"].astype("<f4").tobytes()).decode()  # the wire format
    rows = [(s, p) for s in scales for p in prompts]
    steer = [[{"layer": layer, "vector": vector, "scale": s}] if s else None for s, _ in rows]
    outs = engine.generate(
        [p for _, p in rows],
        {"temperature": 0, "max_new_tokens": max_new_tokens, "repetition_penalty": 1.2},
        steer=steer,
        capture={"layers": [layer], "positions": "all"},
    )
    result: dict[float, dict[str, Any]] = {s: {"texts": [], "steered_projection": []} for s in scales}
    for (s, _), out in zip(rows, outs):
        acts = decode_captured(out["meta_info"]["captured"][0])[: out["meta_info"]["prompt_tokens"]]
        result[s]["texts"].append(out["text"])
        result[s]["steered_projection"].append(float((acts @ direction["unit"]).mean()))
    return result


def judge_scores(engine: Engine, texts: list[str]) -> list[float]:
    """log P(" positive") - log P(" negative") of the unsteered model asked about each text."""
    tok = engine.tokenizer
    good, bad = tok.encode(" positive")[0], tok.encode(" negative")[0]
    outs = engine.generate(
        [JUDGE.format(text=t.strip()) for t in texts],
        {"temperature": 0, "max_new_tokens": 1},
        return_logprob=True,
        token_ids_logprob=[good, bad],
    )
    scores = []
    for o in outs:
        lps = {tid: lp for lp, tid, _ in o["meta_info"]["output_token_ids_logprobs"][0]}
        scores.append(lps[good] - lps[bad])
    return scores


def lexicon_score(text: str) -> int:
    words = ["".join(c for c in w.lower() if c.isalpha()) for w in text.split()]
    return sum(w in GOOD_WORDS for w in words) - sum(w in BAD_WORDS for w in words)


def run(
    model_path: str | None = None,
    layer: int = 10,
    scales: tuple[float, ...] = (-8, -4, 0, 4, 8),
    prompts: list[str] = PROMPTS,
    max_new_tokens: int = 32,
    **engine_args: Any,
) -> dict[str, Any]:
    engine_args.setdefault("dtype", "float32")
    engine_args.setdefault("disable_torch_compile", True)  # steered batches run eager anyway
    with Engine(model_path, enable_interventions=True, **engine_args) as engine:
        direction = sentiment_direction(engine, layer)
        steered = steer_generate(engine, direction, list(scales), prompts, max_new_tokens)
        for row in steered.values():
            row["judge"] = judge_scores(engine, row["texts"])
            row["lexicon"] = [lexicon_score(t) for t in row["texts"]]
            reread = mean_activations(engine, [t if t.strip() else "." for t in row["texts"]], layer)
            row["reread_projection"] = (reread @ direction["unit"]).tolist()
    summary = {
        s: {
            k: float(np.mean(row[k])) for k in ("judge", "lexicon", "reread_projection", "steered_projection")
        }
        for s, row in steered.items()
    }
    return {
        "layer": layer,
        "direction_norm": direction["norm"],
        "residual_norm": direction["residual_norm"],
        "held_out_accuracy": direction["held_out_accuracy"],
        "train_projection": direction["train_projection"],
        "direction": direction["direction"].tolist(),
        "scales": {str(s): row for s, row in steered.items()},
        "summary": {str(s): v for s, v in summary.items()},
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [float(s) for s in results["summary"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, label in zip(
        axes,
        ("judge", "lexicon", "reread_projection"),
        (
            "judge: log P(positive) - log P(negative)",
            "lexicon: good - bad words",
            "re-read projection on direction",
        ),
    ):
        per_prompt = np.array([results["scales"][s][key] for s in results["summary"]])
        ax.plot(scales, per_prompt, "o", color="C7", alpha=0.5)
        ax.plot(scales, per_prompt.mean(axis=1), "o-", color="C0", label="mean over prompts")
        ax.set_xlabel(f"steering scale (x direction, layer {results['layer']})")
        ax.set_title(label, fontsize=10)
        ax.axhline(0, color="k", lw=0.5)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--scales", type=float, nargs="+", default=[-8, -4, 0, 4, 8])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    results = run(args.model_path, args.layer, tuple(args.scales), max_new_tokens=args.max_new_tokens)
    OUT.mkdir(exist_ok=True)
    (OUT / "steering_sentiment.json").write_text(json.dumps(results, indent=2))
    plot(results, OUT / "steering_sentiment.png")
    print(
        f"layer {args.layer}: |direction| {results['direction_norm']:.1f} (residual norm {results['residual_norm']:.1f}), "
        f"held-out accuracy {results['held_out_accuracy']:.2f}"
    )
    for s, row in results["summary"].items():
        print(
            f"scale {float(s):+5.1f}: judge {row['judge']:+.2f}  lexicon {row['lexicon']:+.2f}  "
            f"re-read projection {row['reread_projection']:+.2f}  | {results['scales'][s]['texts'][0]!r}"
        )
    print(f"wrote {OUT / 'steering_sentiment.json'} and .png")


if __name__ == "__main__":
    main()
