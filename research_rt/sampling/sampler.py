"""Sampling from logits in torch (greedy argmax by a C++ op on CPU), per-request parameters as batch tensors.

Order (as SGLang): custom logit processors -> penalties (repetition, frequency, presence) ->
grammar masks -> min_new_tokens (stop ids masked, unless the grammar allows nothing else) ->
temperature -> top-k, top-p, min-p -> draw. Greedy requests take the argmax of the processed logits;
logprobs are those of the processed (masked) distribution, -inf clamped to float32's minimum as SGLang
does, so JSON stays valid. Each sampled request draws from its own `torch.Generator`, so
a seeded request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from research_rt.core.req import Req
from research_rt.kernels import argmax_op
from research_rt.sampling.custom_logit_processor import apply_logit_processors
from research_rt.sampling.grammar_mask import apply_grammar_masks, constrained_rows


@dataclass
class SampleResult:
    next_ids: list[int]
    logprobs: torch.Tensor | None  # [B, V] log-probabilities of the sampled-from distribution


def apply_penalties(logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
    """Repetition (multiplicative, over prompt + output), frequency and presence (over output)."""
    if not any(
        r.sampling.repetition_penalty != 1.0 or r.sampling.frequency_penalty or r.sampling.presence_penalty
        for r in reqs
    ):
        return logits
    bs, vocab = logits.shape
    counts = torch.zeros(bs, vocab, dtype=torch.float32)
    seen = torch.zeros(bs, vocab, dtype=torch.bool)
    for i, r in enumerate(reqs):
        if r.output_ids:
            out = torch.tensor(r.output_ids, dtype=torch.int64)
            counts[i].index_add_(0, out, torch.ones(len(out)))
        if r.sampling.repetition_penalty != 1.0:
            seen[i, torch.tensor(r.fill_ids, dtype=torch.int64)] = True
    rep = torch.tensor([r.sampling.repetition_penalty for r in reqs], dtype=torch.float32)[:, None]
    freq = torch.tensor([r.sampling.frequency_penalty for r in reqs], dtype=torch.float32)[:, None]
    pres = torch.tensor([r.sampling.presence_penalty for r in reqs], dtype=torch.float32)[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - freq * counts - pres * (counts > 0).float()


CANDIDATES = 1024  # top-k/top-p usually keep far fewer tokens: filter among the top 1024, not a full sort


def filter_probs(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Zero out tokens outside top-k, the top-p nucleus and below min_p x max; renormalise.

    Rows that truncate look only at their `CANDIDATES` most likely tokens when that provably holds
    the kept set (top_k within it, or the candidates' mass already reaches top_p); otherwise they
    fall back to a full sort. The most likely token is always kept.
    """
    vocab = probs.shape[-1]
    truncating = ((top_k < vocab) | (top_p < 1.0)).nonzero().flatten()
    out = probs.clone()
    if truncating.numel():
        p = probs[truncating]
        k, tp = top_k[truncating], top_p[truncating]
        width = min(vocab, int(k.max()), CANDIDATES)
        vals, idx = p.topk(width, dim=-1)
        if width < vocab and not bool(((k <= width) | (vals.sum(-1) >= tp)).all()):
            vals, idx = p.sort(dim=-1, descending=True)
        ranks = torch.arange(vals.shape[-1])[None, :]
        keep = (ranks < k[:, None]) & ((vals.cumsum(-1) - vals) < tp[:, None])
        keep[:, 0] = True
        out[truncating] = torch.zeros_like(p).scatter_(-1, idx, vals * keep)
    if bool((min_p > 0).any()):
        out = out * (probs >= min_p[:, None] * probs.max(-1, keepdim=True).values)
    return out / out.sum(-1, keepdim=True)


def sample_rows(probs: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
    """One draw per row by inverse CDF: a single uniform from the row's own generator, searched in
    the row's cumulative sum (right side: a token of probability zero is never picked)."""
    u = torch.cat([torch.rand(1, generator=gen) for gen in generators])
    cdf = probs.float().cumsum(-1)
    return (
        torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
        .clamp_(max=probs.shape[-1] - 1)[:, 0]
        .tolist()
    )


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` (first index on ties): the C++ op for float32 on CPU, 12x torch's CPU
    argmax on a [64, 49152] batch (csrc/argmax.cpp), else torch."""
    op = argmax_op() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    return op(logits) if op is not None and logits.dim() == 2 else logits.argmax(dim=-1)


def edits_in_place(reqs: list[Req]) -> bool:
    """Whether a logit processor, a grammar or a pending min_new_tokens will write into the logits."""
    return any(
        r.logit_processor is not None
        or r.custom_logit_processor is not None
        or r.grammar is not None
        or len(r.output_ids) < r.sampling.min_new_tokens
        for r in reqs
    )


class Sampler:
    def __call__(self, logits: torch.Tensor, reqs: list[Req], want_logprobs: bool) -> SampleResult:
        # one float32 copy where a step below edits in place (the model's output may be an inference
        # tensor, or a buffer the caller keeps); plain batches read the model's output as it is: the
        # copy of batch 64's [64, 49152] logits cost 2.8 ms a step (SmolLM2, Xeon VM, 2026-12-06)
        logits = logits.to(torch.float32, copy=edits_in_place(reqs))
        apply_logit_processors(logits, reqs)
        logits = apply_penalties(logits, reqs)
        grammar_rows = constrained_rows(reqs)
        if grammar_rows:
            apply_grammar_masks(logits, reqs, grammar_rows)
        for i, r in enumerate(reqs):
            if len(r.output_ids) < r.sampling.min_new_tokens:
                stop = sorted((set(r.stop_ids) | set(r.sampling.stop_token_ids or [])) - {None})
                if stop:
                    idx = torch.tensor(stop, dtype=torch.int64)
                    kept = logits[i, idx].clone()
                    logits[i, idx] = float("-inf")
                    if r.grammar is not None and not torch.isfinite(logits[i]).any():
                        logits[i, idx] = kept  # the grammar allows only a stop token: it wins
        temps = [r.sampling.temperature for r in reqs]
        # greedy requests have temperature 1 (SamplingParams.normalize): no pass over [B, vocab] for them
        scaled = logits if all(t == 1.0 for t in temps) else logits / torch.tensor(temps)[:, None]
        logprobs = None
        if want_logprobs:
            logprobs = torch.log_softmax(scaled, dim=-1).clamp_(min=torch.finfo(torch.float32).min)

        next_ids = greedy_ids(scaled).tolist()
        sampled = [i for i, r in enumerate(reqs) if not r.sampling.is_greedy]
        if sampled:
            idx = torch.tensor(sampled, dtype=torch.int64)
            probs = torch.softmax(scaled[idx], dim=-1)
            probs = filter_probs(
                probs,
                torch.tensor([reqs[i].sampling.top_k for i in sampled], dtype=torch.int64),
                torch.tensor([reqs[i].sampling.top_p for i in sampled], dtype=torch.float32),
                torch.tensor([reqs[i].sampling.min_p for i in sampled], dtype=torch.float32),
            )
            for i, tok in zip(sampled, sample_rows(probs, [reqs[i].generator for i in sampled])):
                next_ids[i] = tok
        return SampleResult(next_ids, logprobs)
