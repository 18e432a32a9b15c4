"""The Engine's `/v1/score` (frontend/score_input.py has the input rules): a mixin of `Engine`.

Each item is one prefill of its prompt (query + item) that samples a single greedy token, whose
logprobs of `label_token_ids` are the scores. With the radix cache on, the prompts' common prefix
(the query, when it comes first) is prefilled once before the items, so every item reuses its KV
and computes only its own tokens (`usage.prompt_tokens_details.cached_tokens` counts them).
"""

from __future__ import annotations

import asyncio
from typing import Any

from research_rt.core.errors import RequestError
from research_rt.core.messages import ReqOutput
from research_rt.engine.collector import OutputCollector
from research_rt.frontend.embedding_input import NOT_GENERATION
from research_rt.frontend.generate_input import GenerateInput
from research_rt.frontend.score_input import ScoreInput, common_prefix, label_scores


class ScoreMixin:
    """Needs the Engine's `is_embedding`, `builder`, `server_args`, `_submit`, `_submit_after_prefill`, `_abort_remaining`."""

    def score(
        self,
        query: str | list[int] | None = None,
        items: str | list[str] | list[list[int]] | None = None,
        label_token_ids: list[int] | None = None,
        apply_softmax: bool = False,
        item_first: bool = False,
    ) -> list[list[float]]:
        """One list per item: the score of each label token, in `label_token_ids` order (SGLang's
        `Engine.score`)."""
        obj = ScoreInput(query, items, label_token_ids, apply_softmax, item_first)
        collector = self._start_score(obj, None)
        try:
            done = dict(collector)
        finally:
            self._abort_remaining(collector)
        return _result(obj, [done[i] for i in range(len(done))])["scores"]

    async def async_score(self, obj: ScoreInput) -> dict[str, Any]:
        """`{"scores", "usage"}` for `/v1/score`; aborts the items if cancelled."""
        collector = self._start_score(obj, asyncio.get_running_loop())
        done: dict[int, ReqOutput] = {}
        try:
            async for index, out in collector:
                done[index] = out
        finally:
            self._abort_remaining(collector)
        return _result(obj, [done[i] for i in range(len(done))])

    def _start_score(self, obj: ScoreInput, loop: asyncio.AbstractEventLoop | None) -> OutputCollector:
        if self.is_embedding:
            raise RequestError(NOT_GENERATION)
        obj.validate(self.builder.vocab_size)
        prompts = obj.prompts(self.builder.tokenize)
        gen = GenerateInput(
            input_ids=prompts,
            sampling_params={"max_new_tokens": 1, "temperature": 0},
            return_logprob=True,
            token_ids_logprob=list(obj.label_token_ids or []),
        )
        reqs = [g[0] for g in self.builder.make_reqs(gen)]
        collector = OutputCollector([r.rid for r in reqs], loop)
        shared = common_prefix(prompts)
        if len(reqs) < 2 or not shared or self.server_args.disable_radix_cache:
            self._submit(reqs, collector.put)
        else:
            self._submit_after_prefill([shared], reqs, collector.put)
        return collector


def _result(obj: ScoreInput, outs: list[ReqOutput]) -> dict[str, Any]:
    scores = []
    for out in outs:
        if out.error is not None:
            raise RequestError(*out.error)
        lp = out.logprobs
        if lp is None or not lp.output_token_ids_logprobs:
            reason = out.finished_reason.to_json() if out.finished_reason else None
            raise RequestError(f"The scoring request ended before its next token was scored ({reason}).")
        scores.append(label_scores(lp.output_token_ids_logprobs[0], obj.apply_softmax))
    prompt_tokens = sum(o.prompt_tokens for o in outs)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 0,
        "total_tokens": prompt_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in outs)},
    }
    return {"scores": scores, "usage": usage}
