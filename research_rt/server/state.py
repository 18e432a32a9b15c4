"""What every handler shares: the engine, the live server args, the weight-update lock, metrics.

Every generation holds the *reader* side of `ModelUpdateLock` for its whole life; a weight update
takes the *writer* side, so it waits for in-flight requests and new requests wait for it (SGLang's
`model_update_lock`). `ServerState.generate` is the one way handlers run the engine: it takes the
lock, records metrics, and closes the engine's generator (which aborts unfinished requests) however
the caller leaves: finished, error, client gone (task cancelled) or stopped early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from research_rt.core.errors import RequestError
from research_rt.engine.engine import Engine, GenerateEvent
from research_rt.frontend.embedding_input import EmbeddingInput
from research_rt.frontend.generate_input import GenerateInput
from research_rt.server.metrics import Metrics
from research_rt.server_args import ServerArgs

logger = logging.getLogger("research_rt.server")


class ModelUpdateLock:
    """An asyncio reader/writer lock that prefers writers (a waiting update blocks new readers)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            self._readers -= 1
            await _notify(self._cond)

    @contextlib.asynccontextmanager
    async def writer(self) -> AsyncIterator[None]:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            self._writer = False
            await _notify(self._cond)


async def _notify(cond: asyncio.Condition) -> None:
    # shielded: a cancelled request must still wake the waiters it was blocking
    async def notify() -> None:
        async with cond:
            cond.notify_all()

    await asyncio.shield(notify())


@dataclass
class ServerState:
    engine: Engine
    server_args: ServerArgs  # live copy: model_path / served_model_name change after a weight update
    metrics: Metrics
    lock: ModelUpdateLock = field(default_factory=ModelUpdateLock)
    started: float = field(default_factory=time.time)

    @classmethod
    def create(cls, engine: Engine, args: ServerArgs) -> ServerState:
        """Fill in what SGLang's ServerArgs defaults to the model path (tokenizer, served name)."""
        path = args.model_path or engine.model_path
        args = args.replace(
            model_path=path,
            tokenizer_path=args.tokenizer_path or path,
            served_model_name=args.served_model_name or path,
            is_embedding=engine.is_embedding,  # also set when detected from the architecture
        )
        return cls(engine=engine, server_args=args, metrics=Metrics())

    @property
    def model_path(self) -> str:
        return self.server_args.model_path or self.engine.model_path

    @property
    def served_model_name(self) -> str:
        return self.server_args.served_model_name or self.model_path

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def generate(
        self, obj: GenerateInput, incremental_ids: bool = False
    ) -> AsyncIterator[GenerateEvent]:
        """Run `obj` through the engine under the reader lock, recording metrics; yields the
        engine's events. Validation errors (`RequestError`) are raised at the first `__anext__`."""
        async with self.lock.reader():
            t0 = time.perf_counter()
            first_token_seen: set[int] = set()
            async with contextlib.aclosing(self.engine.async_generate(obj, incremental_ids)) as events:
                async for event in events:
                    meta = event.response["meta_info"]
                    if obj.log_metrics:
                        if event.index not in first_token_seen and meta["completion_tokens"] > 0:
                            first_token_seen.add(event.index)
                            self.metrics.observe_ttft(time.perf_counter() - t0)
                        if event.finished:
                            elapsed = time.perf_counter() - t0
                            self.metrics.observe_finished(
                                meta["prompt_tokens"], meta["completion_tokens"], elapsed
                            )
                    yield event

    async def encode(self, obj: EmbeddingInput) -> tuple[list[dict[str, Any]], bool]:
        """Run an embedding request under the reader lock; (responses in order, single?)."""
        async with self.lock.reader():
            t0 = time.perf_counter()
            results, single = await self.engine.async_encode(obj)
        if obj.log_metrics:
            for resp in results:
                self.metrics.observe_finished(resp["meta_info"]["prompt_tokens"], 0, time.perf_counter() - t0)
        return results, single

    async def collect(self, obj: GenerateInput) -> list[dict[str, Any]]:
        """Run to completion; the final responses in flattened-batch order. A request that ended
        as a client error (e.g. 400: the pool is too small) raises it as a RequestError."""
        finals: dict[int, GenerateEvent] = {}
        async with contextlib.aclosing(self.generate(obj)) as events:
            async for event in events:
                if event.finished:
                    finals[event.index] = event
        ordered = [finals[i] for i in sorted(finals)]
        err = next((e.error for e in ordered if e.error is not None), None)
        if err is not None:
            raise RequestError(*err)
        return [e.response for e in ordered]

    async def live_stats(self) -> dict[str, Any]:
        """The engine's stats snapshot (taken on the scheduler thread between two steps), as a dict.

        `kv_pool_whole` is the pool integrity check (free + cached == total, no slot owned twice,
        nothing locked) when the scheduler is idle, and null while requests are queued or running.
        """
        stats = await asyncio.get_running_loop().run_in_executor(None, self.engine.stats)
        return stats.as_dict()
