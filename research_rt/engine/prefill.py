"""Admission of waiting requests into a prefill step: policy order, budgets and chunking.

Budgets for one step:
- tokens to compute: `chunked_prefill_size` (a request larger than what is left is cut, and the
  rest carried to the next step as the single "chunked" request) and `max_prefill_tokens`;
- KV room: free + evictable slots, minus what running requests are still expected to need for
  decoding (remaining max_new_tokens x `new_token_ratio`, which decays while nothing is retracted);
- `max_running_requests` and free rows of the request table.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from research_rt.cache.radix_cache import RadixCache
from research_rt.engine.req import Req

DECODE_CLIP = 4096  # cap on the decode room reserved per request


@dataclass
class PrefillItem:
    req: Req
    start: int  # first token of fill_ids computed in this step (== cached prefix length)
    length: int  # tokens computed in this step
    is_last_chunk: bool


def order_waiting(waiting: list[Req], policy: str, tree: RadixCache) -> list[Req]:
    if policy == "lpm" and not tree.disable and len(waiting) > 1:
        lens = {id(r): len(tree.match_prefix(r.fill_ids[:-1])[0]) for r in waiting}
        return sorted(waiting, key=lambda r: -lens[id(r)])
    if policy == "random":
        out = list(waiting)
        random.shuffle(out)
        return out
    return list(waiting)


def decode_reserve(running: list[Req], ratio: float) -> int:
    return int(sum(min(r.max_new_tokens - len(r.output_ids), DECODE_CLIP) * ratio for r in running))


def max_prefix_len(req: Req) -> int:
    """How much of fill_ids may come from the cache: all but one token, and, when input logprobs
    are wanted, nothing past logprob_start_len (those positions must be computed)."""
    n = req.seq_len - 1
    if req.return_logprob and not req.is_retracted:
        n = min(n, max(req.logprob_start_len, 0))
    return max(n, 0)
