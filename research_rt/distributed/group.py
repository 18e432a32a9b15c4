"""The tensor-parallel process group and its two collectives.

gloo on CPU; on CUDA NCCL for the tensors plus a gloo group for control messages (pickled step
batches, commands). The collectives are custom ops (opaque to the compiler, kept in the compiled
decode step as extern calls), so tp > 1 keeps the compiled default. Measured: torch's functional
collectives (`_functional_collectives`) compile on gloo for a fixed shape, but inside the
dynamic-batch decode graph they made Dynamo specialize the batch dimension
(ConstraintViolationError on input_ids.size(0)); the opaque ops leave it symbolic.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

# ranks 1..N-1 wait in a broadcast between steps: an idle server must not time them out
IDLE_TIMEOUT = datetime.timedelta(days=30)

_control_group: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class TPInfo:
    """This process's place in the tensor-parallel group."""

    rank: int = 0
    size: int = 1


def init_tp_group(rank: int, size: int, port: int, device: str) -> None:
    """Join the group (rank 0 and its spawned ranks meet at 127.0.0.1:`port`)."""
    global _control_group
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=IDLE_TIMEOUT,
    )
    _control_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if backend == "nccl" else None


def control_group() -> dist.ProcessGroup | None:
    """The gloo group for pickled messages (None: the default group, already gloo)."""
    return _control_group


def destroy_tp_group() -> None:
    global _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


@torch.library.custom_op("research_rt::tp_all_reduce", mutates_args=())
def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    dist.all_reduce(out)
    return out


@_all_reduce.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("research_rt::tp_all_gather_last", mutates_args=())
def _all_gather_last(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


@_all_gather_last.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] * dist.get_world_size())


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the ranks (a no-op outside a group)."""
    return _all_reduce(x) if dist.is_initialized() else x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` concatenated along the last dimension, in rank order."""
    return _all_gather_last(x) if dist.is_initialized() else x
