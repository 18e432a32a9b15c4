"""Updating the weights of a running model from disk or from tensors, rolled back on failure
(SGLang's messages).

Runs on the scheduler thread between steps. Weights are copied into the existing parameter
storage (compiled code stays valid); a snapshot taken just before lets a failure mid-way restore
the old weights exactly. The prefix cache is flushed afterwards: its KV came from the old weights
(from tensors: unless `flush_cache` is false; the flush waits for no request, it is skipped with a
warning while any holds KV, e.g. paused in place).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from research_rt.kernels import forget_packed_weights
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

    failure = _rolled_back(engine, lambda: engine.runner.update_weights(source, load_format))
    if failure is not None:
        return _fail(failure)
    _flush(engine)
    logger.info("Update weights end.")
    return True, SUCCESS, source


TENSOR_FORMATS = (None, "direct")


def update_weights_from_tensor_on_scheduler(
    engine: Any, named: list[tuple[str, torch.Tensor]], load_format: str | None, flush_cache: bool
) -> tuple[bool, str]:
    """Copy `named` into the model: checkpoint names (load_format None), or the runtime's own
    parameter names ("direct"). Only the given tensors change; a partial update is fine."""
    if load_format not in TENSOR_FORMATS:
        return _fail(f"Unsupported load_format {load_format!r} for tensors: use null or 'direct'.")[:2]
    logger.info("Update weights from %d tensors (load_format=%s).", len(named), load_format)
    failure = _rolled_back(
        engine, lambda: engine.runner.update_weights_from_tensors(named, direct=load_format == "direct")
    )
    if failure is not None:
        return _fail(failure)[:2]
    if flush_cache:
        _flush(engine)
    return True, SUCCESS


def _rolled_back(engine: Any, update) -> str | None:
    """Run `update`; on any failure restore every parameter and return the message."""
    model = engine.runner.model
    backup = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        update()
    except Exception as e:  # noqa: BLE001 - any failure rolls back
        with torch.inference_mode():
            for name, p in model.named_parameters():
                p.data.copy_(backup[name])
        forget_packed_weights()
        return f"Failed to update weights: {e}.\nRolling back to original weights."
    finally:
        del backup
    return None


def _flush(engine: Any) -> None:
    if not engine.scheduler.flush_cache():
        logger.warning("Weights updated but the cache could not be flushed (requests pending).")


def _fail(message: str) -> tuple[bool, str, None]:
    logger.error(message)
    return False, message, None
