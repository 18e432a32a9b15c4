"""`/update_weights_from_disk`: swap the weights in place, roll back on failure (SGLang's messages).

The update runs under the writer side of the model-update lock (in-flight generations finish
first, new ones wait), and on the scheduler thread between steps. Weights are copied into the
existing parameter storage (compiled code stays valid); a snapshot taken just before lets a
failure mid-way restore the old weights exactly.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from research_rt.loader.model_loader import weight_iterator
from research_rt.loader.resolve import ModelNotFoundError, resolve_model_path
from research_rt.server.state import ServerState
from research_rt.server_args import LOAD_FORMATS

logger = logging.getLogger("research_rt.server")

SUCCESS = "Succeeded to update model weights."


async def update_weights_from_disk(
    state: ServerState, model_path: str, load_format: str | None
) -> tuple[bool, str]:
    """Returns (success, message); on success `model_path` and the served model name change."""
    fmt = load_format or state.server_args.load_format
    engine = state.engine
    async with state.lock.writer():
        logger.info("Start update_weights. Load format=%s", fmt)
        loop = asyncio.get_running_loop()
        success, message = await loop.run_in_executor(
            None, lambda: engine.call_in_scheduler(lambda: _update_on_scheduler(engine, model_path, fmt))
        )
        if success:
            state.server_args = state.server_args.replace(
                model_path=model_path, load_format=fmt, served_model_name=model_path
            )
            engine.model_path = model_path
    return success, message


def _update_on_scheduler(engine, model_path: str, load_format: str) -> tuple[bool, str]:
    logger.info("Update engine weights online from disk begin.")
    if load_format not in LOAD_FORMATS:
        return _fail(f"Failed to get model loader: {load_format}.")
    try:
        source = resolve_model_path(model_path)
        weight_iterator(source, load_format)  # cheap: checks the files exist for this format
    except (ModelNotFoundError, ValueError, OSError) as e:
        return _fail(f"Failed to get weights iterator: {e}.")

    model = engine.runner.model
    backup = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        engine.runner.update_weights(source, load_format)
    except Exception as e:  # noqa: BLE001 - any failure rolls back
        with torch.inference_mode():
            for name, p in model.named_parameters():
                p.data.copy_(backup[name])
        return _fail(f"Failed to update weights: {e}.\nRolling back to original weights.")
    finally:
        del backup
    engine.source = source
    if not engine.scheduler.flush_cache():
        logger.warning("Weights updated but the cache could not be flushed (requests pending).")
    logger.info("Update weights end.")
    return True, SUCCESS


def _fail(message: str) -> tuple[bool, str]:
    logger.error(message)
    return False, message
