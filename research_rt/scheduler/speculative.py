"""One n-gram speculative decode step (--speculative-algorithm NGRAM) in place of a decode step.

Each running request that may speculate (speculative/accept.py) looks up a draft of up to k
tokens in its own prompt + output (speculative/ngram.py). When any request has one, a single
verify forward runs every request's last token plus its drafts as decode rows over KV slots
allocated for them (speculative/verify.py); each drafted request emits its accepted run, the
others sample from their one row exactly as a decode step would. KV slots past what each request
emitted are freed before anything reaches the prefix cache, so the cache holds accepted tokens
only. Otherwise (no drafts, a batch too large to verify cheaply, interventions or expert
recording, no room) the step returns False and the scheduler runs its normal decode step.
"""

from __future__ import annotations

import torch

from research_rt.core.req import Req
from research_rt.sampling.sampler import Sampler
from research_rt.scheduler.cache import CacheManager
from research_rt.scheduler.output import OutputProcessor
from research_rt.speculative.accept import accepted_run, can_speculate
from research_rt.speculative.ngram import NgramMatcher
from research_rt.speculative.verify import draft_budget, verify_logits

MAX_BACKOFF = 16  # decode steps a request skips drafting after verifies that accepted nothing


class SpeculativeDecoder:
    def __init__(self, runner, cache: CacheManager, output: OutputProcessor, sampler: Sampler, args) -> None:
        self.runner = runner
        self.cache = cache
        self.output = output
        self.sampler = sampler
        self.k = args.speculative_num_draft_tokens
        self.windows = (
            args.speculative_ngram_min_match_window_size,
            args.speculative_ngram_max_match_window_size,
        )
        self.matchers: dict[str, NgramMatcher] = {}
        # adaptive disabling: rid -> (steps left to skip, current backoff); a verify that accepts
        # nothing doubles the backoff (up to MAX_BACKOFF), one that accepts resets it
        self.backoff: dict[str, tuple[int, int]] = {}

    def _draft(self, req: Req) -> list[int]:
        if not can_speculate(req):
            return []
        skip, backoff = self.backoff.get(req.rid, (0, 0))
        if skip:
            self.backoff[req.rid] = (skip - 1, backoff)
            return []
        matcher = self.matchers.get(req.rid)
        if matcher is None:
            matcher = self.matchers[req.rid] = NgramMatcher(*self.windows)
        matcher.sync(req.fill_ids)
        return matcher.draft(self.k)

    def step(self, reqs: list[Req]) -> bool:
        """Run a verify step for `reqs` (each already holding its next slot at kv_len), or return
        False (nothing done) for the caller to decode normally."""
        recorder = self.runner.expert_recorder
        if any(r.interventions is not None for r in reqs) or (recorder is not None and recorder.recording):
            return False
        drafts = [self._draft(r) for r in reqs]
        budget = draft_budget(len(reqs), sum(bool(d) for d in drafts), self.k)
        table = self.cache.req_to_token.table
        # no draft past the request's last token (max_new_tokens) or its row of the table
        drafts = [
            d[: min(budget, r.max_new_tokens - len(r.output_ids) - 1, table.shape[1] - 1 - r.kv_len)]
            for r, d in zip(reqs, drafts)
        ]
        total = sum(len(d) for d in drafts)
        if not total:
            return False
        self.cache.evict_for(total)
        extra = self.cache.kv_pool.alloc(total)
        if extra is None:
            return False
        offset = 0
        for req, draft in zip(reqs, drafts):
            table[req.req_pool_row, req.kv_len + 1 : req.kv_len + 1 + len(draft)] = extra[
                offset : offset + len(draft)
            ]
            offset += len(draft)
        logits = verify_logits(self.runner, reqs, drafts)
        self._emit(reqs, drafts, logits.split([1 + len(d) for d in drafts]))
        return True

    def _emit(self, reqs: list[Req], drafts: list[list[int]], logits: tuple[torch.Tensor, ...]) -> None:
        before = [len(r.output_ids) for r in reqs]
        plain = [i for i, d in enumerate(drafts) if not d]
        if plain:
            group = [reqs[i] for i in plain]
            rows = torch.cat([logits[i] for i in plain])
            result = self.sampler(rows, group, want_logprobs=any(r.return_logprob for r in group))
            self.output.process_sampled(group, result)
        for i, req in enumerate(reqs):
            if not drafts[i]:
                continue
            targets = self.sampler(logits[i], [req] * len(logits[i]), want_logprobs=False).next_ids
            run = accepted_run(targets, drafts[i])
            self.output.append_run(req, run)
            req.spec_verify_ct = (req.spec_verify_ct or 0) + 1
            req.spec_draft_token_num += len(drafts[i])
            accepted = min(len(run) - 1, len(drafts[i]))
            req.spec_accept_token_num += accepted
            backoff = 0 if accepted else min(2 * self.backoff.get(req.rid, (0, 0))[1] or 1, MAX_BACKOFF)
            self.backoff[req.rid] = (backoff, backoff)
        for req, draft, n in zip(reqs, drafts, before):
            emitted = len(req.output_ids) - n  # KV holds the last token and the emitted ones but the last
            row = req.req_pool_row
            self.cache.kv_pool.free(
                self.cache.req_to_token.table[row, req.kv_len + emitted : req.kv_len + len(draft) + 1].clone()
            )
            req.kv_len += emitted
            if req.finished:
                self.cache.cache_req(req, finished=True)
                self.matchers.pop(req.rid, None)
                self.backoff.pop(req.rid, None)
        if len(self.matchers) > 2 * len(reqs) + 16:  # requests that ended elsewhere (aborts, ...)
            live = {r.rid for r in reqs}
            self.matchers = {rid: m for rid, m in self.matchers.items() if rid in live}
            self.backoff = {rid: b for rid, b in self.backoff.items() if rid in live}
        self.output.emit(reqs)
