"""Shared pieces of the benchmarks: the SmolLM2 prompts, timing, and the transformers baseline."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

STORY = "<|im_start|>user\nTell me a long story about a dragon who learns to paint.<|im_end|>\n<|im_start|>assistant\n"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def random_prompts(tokenizer, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """n prompts of lo..hi tokens cut from real text (so the model sees plausible input)."""
    rng = random.Random(seed)
    words = (
        "the of and a to in is you that it he was for on are as with his they at be this have from "
        "or one had by word but not what all were we when your can said there use an each which she "
        "do how their if will up other about out many then them these so some her would make like him "
        "into time has look two more write go see number no way could people my than first water been "
        "call who oil its now find long down day did get come made may part"
    ).split()
    ids = tokenizer.encode(" ".join(rng.choice(words) for _ in range(hi * 2)))
    return [ids[(s := rng.randrange(0, len(ids) - hi)) : s + rng.randint(lo, hi)] for _ in range(n)]


def shared_prefix_prompts(
    n: int = 32, prefix_len: int = 1024, suffix_len: int = 32, seed: int = 1
) -> list[list[int]]:
    """The shared-prefix workload (W3): n prompts = one random prefix + a random suffix each."""
    rng = random.Random(seed)
    prefix = [rng.randrange(100, 49000) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(100, 49000) for _ in range(suffix_len)] for _ in range(n)]


def load_hf_smollm(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from research_rt.loader.resolve import default_model_path

    p = Path(default_model_path())
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype).eval()


def hf_generate_tokens_per_s(model, prompts: list[list[int]], new_tokens: int, batch_size: int) -> float:
    """transformers.generate in static batches (left padded), greedy, no early stop."""
    total, elapsed = 0, 0.0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            dt, _ = timed(
                lambda ids=ids, mask=mask: model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            )
        elapsed += dt
        total += new_tokens * len(chunk)
    return total / elapsed


def in_own_thread(fn: Callable[[], T]) -> T:
    """fn() on a thread that ends with it, and its OpenMP thread pool along with it. A parallel torch
    op on the benchmark's main thread leaves a second pool beside the Engine's scheduler thread, and
    libgomp then throttles its spin-waits: single stream 91.0 -> 46.8 tok/s after one `torch.sum` on
    the main thread, 93.4 -> 101.9 after the same sum on a thread of its own (2026-12-07, Zen 5)."""
    result: list = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def read_bandwidth_bytes_per_s(gib: int = 1, repeats: int = 5) -> float:
    """Memory read bandwidth of this run: the best of `repeats` `torch.sum` over `gib` GiB."""
    x = torch.ones(gib << 28, dtype=torch.float32)
    x.sum()
    best = min(timed(x.sum)[0] for _ in range(repeats))
    return x.numel() * 4 / best


def weight_bytes_per_token(dtype: torch.dtype) -> int:
    """Bytes a batch-1 decode step reads: every parameter once (a tied head counted once)."""
    model = load_hf_smollm(dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())
