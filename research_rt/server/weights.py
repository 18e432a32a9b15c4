"""`/update_weights_from_disk`: the engine swaps the weights in place (engine/weights.py) under
the writer side of the model-update lock, so in-flight generations finish first and new ones wait."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from research_rt.server.state import ServerState

logger = logging.getLogger("research_rt.server")


async def update_weights_from_disk(
    state: ServerState, model_path: str, load_format: str | None
) -> tuple[bool, str]:
    """Returns (success, message); on success `model_path` and the served model name change."""
    fmt = load_format or state.server_args.load_format
    engine = state.engine
    async with weight_update_lock(state):
        logger.info("Start update_weights. Load format=%s", fmt)
        loop = asyncio.get_running_loop()
        success, message = await loop.run_in_executor(
            None, lambda: engine.update_weights_from_disk(model_path, fmt)
        )
        if success:
            state.server_args = state.server_args.replace(
                model_path=model_path, load_format=fmt, served_model_name=model_path
            )
    return success, message


@contextlib.asynccontextmanager
async def weight_update_lock(state: ServerState) -> AsyncIterator[None]:
    """The writer side of the model-update lock, except while generation is paused: the paused
    requests hold the reader side until they finish, so waiting for them would never end (SGLang
    updates at once while paused, too)."""
    if state.engine.paused:
        yield
        return
    async with state.lock.writer():
        yield
