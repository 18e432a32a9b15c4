"""The Engine's embedding and expert-distribution API (a mixin of `Engine`, kept apart so the
generation file stays small): `encode` / `async_encode` and the expert-distribution recorder."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable
from typing import Any

from research_rt.engine.embedding import (
    NOT_EMBEDDING,
    EmbeddingInput,
    embedding_response,
    make_embedding_reqs,
)
from research_rt.engine.io_struct import RequestError
from research_rt.engine.req import Req
from research_rt.engine.scheduler import ReqOutput


class EmbeddingAPIMixin:
    """Needs the Engine's `is_embedding`, `runner`, `front`, `model_path`, `_submit`,
    `call_in_scheduler` and `abort_request`."""

    def _start_encode(self, obj: EmbeddingInput, sink: Callable[[ReqOutput], None]) -> tuple[list[Req], bool]:
        if not self.is_embedding:
            raise RequestError(NOT_EMBEDDING)
        pad = getattr(self.runner.model, "pad_token_id", None)
        reqs, single = make_embedding_reqs(self.front, obj, pad)
        self._submit(reqs, sink)
        return reqs, single

    def encode(
        self,
        prompt: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        rid: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Same as `/encode`: `{"embedding": [...], "meta_info": {...}}`, a list for a batch (a
        reward / classification model's scores are its `embedding`)."""
        events: queue.Queue[ReqOutput] = queue.Queue()
        reqs, single = self._start_encode(
            EmbeddingInput(text=prompt, input_ids=input_ids, rid=rid), events.put
        )
        done: dict[str, dict[str, Any]] = {}
        while len(done) < len(reqs):
            out = events.get()
            done[out.req.rid] = embedding_response(out.req)
        results = [done[r.rid] for r in reqs]
        return results[0] if single else results

    async def async_encode(self, obj: EmbeddingInput) -> tuple[list[dict[str, Any]], bool]:
        """(responses in input order, whether the input was a single one); aborts if cancelled."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[ReqOutput] = asyncio.Queue()
        reqs, single = self._start_encode(obj, lambda out: loop.call_soon_threadsafe(events.put_nowait, out))
        done: dict[str, dict[str, Any]] = {}
        try:
            while len(done) < len(reqs):
                out = await events.get()
                done[out.req.rid] = embedding_response(out.req)
        finally:
            for r in reqs:
                if r.rid not in done:
                    self.abort_request(r.rid)
        return [done[r.rid] for r in reqs], single

    # ---------------------------------------------------------------- expert distribution
    def _expert_recorder(self) -> Any:
        recorder = getattr(self.runner, "expert_recorder", None)
        if recorder is None:
            raise RequestError(
                f"{self.model_path} is not a MoE model (no mixture-of-experts layers): there is no expert distribution to record."
            )
        return recorder

    def start_expert_distribution_record(self) -> None:
        """Clear the counts and count every MoE layer's top-k routing from the next step on."""
        recorder = self._expert_recorder()
        self.call_in_scheduler(recorder.start)

    def stop_expert_distribution_record(self) -> None:
        recorder = self._expert_recorder()
        self.call_in_scheduler(recorder.stop)

    def dump_expert_distribution_record(self, directory: str | None = None) -> str:
        """Write `expert_distribution_rank0_timestamp<time>.csv` into `directory` (default: the
        current directory), reset the counts, and return the file's path."""
        recorder = self._expert_recorder()
        return str(self.call_in_scheduler(lambda: recorder.dump(directory or ".")))
