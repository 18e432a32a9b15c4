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

from research_rt.engine.embedding import EmbeddingInput
from research_rt.engine.engine import Engine, Event
from research_rt.engine.io_struct import GenerateInput, RequestError
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

    async def generate(self, obj: GenerateInput, incremental_ids: bool = False) -> AsyncIterator[Event]:
        """Run `obj` through the engine; yields (index, response, finished) like `async_generate`.

        Validation errors (`RequestError`) are raised at the first `__anext__`, before any event.
        """
        async with self.lock.reader():
            t0 = time.perf_counter()
            first_token_seen: set[int] = set()
            async with contextlib.aclosing(self.engine.async_generate(obj, incremental_ids)) as events:
                async for index, resp, finished in events:
                    meta = resp["meta_info"]
                    if not obj.log_metrics:
                        yield index, resp, finished
                        continue
                    if index not in first_token_seen and meta["completion_tokens"] > 0:
                        first_token_seen.add(index)
                        self.metrics.observe_ttft(time.perf_counter() - t0)
                    if finished:
                        self.metrics.observe_finished(
                            meta["prompt_tokens"], meta["completion_tokens"], time.perf_counter() - t0
                        )
                    yield index, resp, finished

    async def encode(self, obj: EmbeddingInput) -> tuple[list[dict[str, Any]], bool]:
        """Run an embedding request under the reader lock; (responses in order, single?)."""
        from research_rt.server.protocol import abort_error

        async with self.lock.reader():
            t0 = time.perf_counter()
            results, single = await self.engine.async_encode(obj)
        for resp in results:
            err = abort_error(resp)
            if err is not None:
                raise RequestError(*err)
            if obj.log_metrics:
                self.metrics.observe_finished(resp["meta_info"]["prompt_tokens"], 0, time.perf_counter() - t0)
        return results, single

    async def collect(self, obj: GenerateInput) -> list[dict[str, Any]]:
        """Run to completion; the final responses in flattened-batch order. An abort carrying an
        HTTP status (e.g. 400: the pool is too small) is raised as a RequestError."""
        from research_rt.server.protocol import abort_error

        finals: dict[int, dict[str, Any]] = {}
        async with contextlib.aclosing(self.generate(obj)) as events:
            async for index, resp, finished in events:
                if finished:
                    finals[index] = resp
        results = [finals[i] for i in sorted(finals)]
        for resp in results:
            err = abort_error(resp)
            if err is not None:
                raise RequestError(*err)
        return results

    async def live_stats(self) -> dict[str, Any]:
        """A consistent snapshot of the scheduler, taken on its thread between two steps.

        `kv_pool_whole` is the pool integrity check (free + cached == total, no slot owned twice,
        nothing locked) when the scheduler is idle, and null while requests are queued or running.
        """
        engine = self.engine

        def snapshot() -> dict[str, Any]:
            s = engine.scheduler
            idle = s.is_idle()
            whole: bool | None = None
            if idle:
                try:
                    s.tree.check_integrity(expect_idle=True)
                    whole = True
                except AssertionError as e:
                    logger.error("KV pool integrity check failed: %s", e)
                    whole = False
            total, free = s.kv_pool.size, s.kv_pool.available_size()
            used = total - free - s.tree.evictable_size
            seen = s.num_prefill_tokens + s.num_cached_tokens
            return {
                "num_running_reqs": len(s.running) + (s.chunked is not None),
                "num_queue_reqs": len(s.waiting),
                "num_used_tokens": used,
                "num_free_tokens": free,
                "num_cached_tokens": s.tree.evictable_size + s.tree.protected_size,
                "token_usage": used / total,
                "cache_hit_rate": s.num_cached_tokens / seen if seen else 0.0,
                "last_gen_throughput": s.last_gen_throughput,
                "kv_pool_whole": whole,
            }

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: engine.call_in_scheduler(snapshot, timeout=30))
