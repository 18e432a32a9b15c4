"""Updating the weights of a running model from disk, rolled back on failure (SGLang's messages).

Runs on the scheduler thread between steps. Weights are copied into the existing parameter
storage (compiled code stays valid); a snapshot taken just before lets a failure mid-way restore
the old weights exactly. The prefix cache is flushed afterwards: its KV came from the old weights.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from research_rt.loader.model_loader import weight_iterator
from research_rt.loader.resolve import ModelNotFoundError, ModelSource, resolve_model_path
from research_rt.server_args import LOAD_FORMATS

logger = logging.getLogger("research_rt.engine")

SUCCESS = "Succeeded to update model weights."


def update_weights_on_scheduler(
    engine: Any, model_path: str, load_format: str
) -> tuple[bool, str, ModelSource | None]:
    """(success, message, the new source when it succeeded)."""
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
    if not engine.scheduler.flush_cache():
        logger.warning("Weights updated but the cache could not be flushed (requests pending).")
    logger.info("Update weights end.")
    return True, SUCCESS, source


def _fail(message: str) -> tuple[bool, str, None]:
    logger.error(message)
    return False, message, None
