"""What rank 0 sends the other tensor-parallel ranks: one pickled command per step or control
action, broadcast on the gloo control group. A step carries the ForwardBatch tensors a rank needs
(input ids, positions, KV slots, attention metadata, the logit rows); each rank pairs them with its
own KV pool shard and attention backend (the slot indices are rank 0's, the same on every rank)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from research_rt.core.forward_batch import ForwardBatch, ForwardMode
from research_rt.distributed.group import control_group


@dataclass
class StepMessage:
    mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_cache_loc: torch.Tensor
    attn_metadata: Any
    logit_rows: torch.Tensor
    compiled: bool  # whether rank 0 runs the compiled step (the ranks take the same path)
    mixed_decode: StepMessage | None = None


def moved(obj: Any, device: torch.device | str) -> Any:
    """`obj` with every tensor (also inside a dataclass: attention metadata) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: moved(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


def step_message(batch: ForwardBatch, logit_rows: torch.Tensor, compiled: bool) -> StepMessage:
    mixed = batch.mixed_decode
    return moved(
        StepMessage(
            batch.mode,
            batch.batch_size,
            batch.input_ids,
            batch.positions,
            batch.out_cache_loc,
            batch.attn_metadata,
            logit_rows,
            compiled,
            None if mixed is None else step_message(mixed, logit_rows[:0], compiled),
        ),
        "cpu",
    )


def batch_of(msg: StepMessage, kv_pool: Any, attn_backend: Any, device: torch.device) -> ForwardBatch:
    """The ForwardBatch `msg` describes, over this rank's KV pool shard."""
    return ForwardBatch(
        mode=msg.mode,
        batch_size=msg.batch_size,
        input_ids=msg.input_ids.to(device),
        positions=msg.positions.to(device),
        out_cache_loc=msg.out_cache_loc.to(device),
        attn_metadata=moved(msg.attn_metadata, device),
        kv_pool=kv_pool,
        attn_backend=attn_backend,
        mixed_decode=None
        if msg.mixed_decode is None
        else batch_of(msg.mixed_decode, kv_pool, attn_backend, device),
    )


def broadcast_command(command: tuple | None = None) -> tuple:
    """Rank 0 sends `command` (kind, *payload); every other rank receives and returns it."""
    box = [command]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def all_ok(error: str | None) -> list[str]:
    """Every rank's error (None: it succeeded), gathered on every rank; returns the errors."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=control_group())
    return [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
