"""Recording logprobs in SGLang v0.4.5's layout (native_api.md §2.5).

Input entries cover prompt positions k..n-1 (k = logprob_start_len): the first entry's logprob is
None (no distribution predicts the first requested token from this pass), and the entry for
position p > k comes from the logits at position p - 1. Output entries come from the distribution
each token was sampled from.
"""

from __future__ import annotations

import torch

from research_rt.core.req import Req


def _top(logprobs: torch.Tensor, k: int) -> list[tuple[float, int]]:
    vals, ids = logprobs.topk(k)
    return list(zip(vals.tolist(), ids.tolist()))


def _given(logprobs: torch.Tensor, token_ids: list[int]) -> list[tuple[float, int]]:
    return [(float(logprobs[t]), t) for t in token_ids]


def record_input_logprobs(req: Req, logits: torch.Tensor, positions: list[int]) -> None:
    """`logits[i]` is the model's prediction at prompt position `positions[i]` (for token p + 1)."""
    if not req.input_token_logprobs:
        first = req.input_ids[req.logprob_start_len]
        req.input_token_logprobs.append((None, first))
        if req.top_logprobs_num:
            req.input_top_logprobs.append(None)
        if req.token_ids_logprob:
            req.input_token_ids_logprobs.append(None)
    if not positions:
        return
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor([req.input_ids[p + 1] for p in positions], dtype=torch.int64)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    req.input_token_logprobs.extend(zip(chosen, targets.tolist()))
    for row in range(len(positions)):
        if req.top_logprobs_num:
            req.input_top_logprobs.append(_top(logprobs[row], req.top_logprobs_num))
        if req.token_ids_logprob:
            req.input_token_ids_logprobs.append(_given(logprobs[row], req.token_ids_logprob))


def record_output_logprobs(req: Req, logprobs: torch.Tensor, token: int) -> None:
    req.output_token_logprobs.append((float(logprobs[token]), token))
    if req.top_logprobs_num:
        req.output_top_logprobs.append(_top(logprobs, req.top_logprobs_num))
    if req.token_ids_logprob:
        req.output_token_ids_logprobs.append(_given(logprobs, req.token_ids_logprob))
