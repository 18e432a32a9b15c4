"""The Engine's embedding API (`/encode`, `/classify`, `/v1/embeddings`): a mixin of `Engine`.

An embedding request is a prefill-only `Req`; its snapshot carries the pooled vector (or a score
head's scores) as `embedding`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from research_rt.core.errors import RequestError
from research_rt.core.messages import ReqOutput
from research_rt.engine.collector import OutputCollector
from research_rt.frontend.embedding_input import NOT_EMBEDDING, EmbeddingInput, make_embedding_reqs
from research_rt.frontend.response import embedding_response


class EncodeMixin:
    """Needs the Engine's `is_embedding`, `runner`, `builder`, `weight_version`, `_submit` and
    `_abort_remaining`."""

    def _start_encode(
        self, obj: EmbeddingInput, loop: asyncio.AbstractEventLoop | None
    ) -> tuple[OutputCollector, bool]:
        if not self.is_embedding:
            raise RequestError(NOT_EMBEDDING)
        pad = getattr(self.runner.model, "pad_token_id", None)
        reqs, single = make_embedding_reqs(self.builder, obj, pad)
        collector = OutputCollector([r.rid for r in reqs], loop)
        self._submit(reqs, collector.put)
        return collector, single

    def encode(
        self,
        prompt: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        rid: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Same as `/encode`: `{"embedding": [...], "meta_info": {...}}`, a list for a batch (a
        reward / classification model's scores are its `embedding`)."""
        collector, single = self._start_encode(
            EmbeddingInput(text=prompt, input_ids=input_ids, rid=rid), None
        )
        done = dict(collector)
        results = [embedding_response(done[i], self.weight_version) for i in range(len(done))]
        return results[0] if single else results

    async def async_encode(self, obj: EmbeddingInput) -> tuple[list[dict[str, Any]], bool]:
        """(responses in input order, whether the input was a single one); a request that ended
        as a client error raises it; aborts the call's requests if cancelled."""
        collector, single = self._start_encode(obj, asyncio.get_running_loop())
        done: dict[int, ReqOutput] = {}
        try:
            async for index, out in collector:
                done[index] = out
        finally:
            self._abort_remaining(collector)
        outs = [done[i] for i in range(len(done))]
        err = next((o.error for o in outs if o.error is not None), None)
        if err is not None:
            raise RequestError(*err)
        return [embedding_response(o, self.weight_version) for o in outs], single
