"""Collecting one call's outputs: the scheduler thread puts `ReqOutput` snapshots in, the caller
takes `(index, snapshot)` pairs out, blocking (`for`) or awaiting (`async for`), until every one
of its requests has finished. Used alike by generate and encode, sync and async."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from research_rt.core.messages import ReqOutput


@dataclass(frozen=True)
class GenerateEvent:
    """One output of `async_generate`: the request's position in the flattened batch, its
    `/generate` response so far, and (when it ended as a client error) (message, HTTP status)."""

    index: int
    response: dict[str, Any]
    finished: bool
    error: tuple[str, int] | None = None


class OutputCollector:
    def __init__(self, rids: list[str], loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.index_of = {rid: i for i, rid in enumerate(rids)}
        self.remaining = set(rids)
        self._loop = loop
        self._queue: queue.Queue[ReqOutput] | asyncio.Queue[ReqOutput] = (
            asyncio.Queue() if loop is not None else queue.Queue()
        )

    def put(self, out: ReqOutput) -> None:
        """Called on the scheduler thread."""
        if self._loop is None:
            self._queue.put(out)  # type: ignore[union-attr]
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)

    def _take(self, out: ReqOutput) -> tuple[int, ReqOutput]:
        if out.finished:
            self.remaining.discard(out.rid)
        return self.index_of[out.rid], out

    def __iter__(self) -> Iterator[tuple[int, ReqOutput]]:
        while self.remaining:
            yield self._take(self._queue.get())  # type: ignore[union-attr]

    async def __aiter__(self) -> AsyncIterator[tuple[int, ReqOutput]]:
        while self.remaining:
            yield self._take(await self._queue.get())  # type: ignore[misc]
