"""Ranks 1..N-1 of a tensor-parallel group: each a spawned process with its shard of the model
and of the KV pool, running what rank 0 broadcasts until told to stop.

A rank exits on "shutdown", when the group breaks (rank 0 died: the broadcast raises), or when its
parent process is gone (a watchdog thread): no rank outlives the server.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import torch

from research_rt.distributed.group import destroy_tp_group, init_tp_group
from research_rt.executor.model_runner import ModelRunner
from research_rt.executor.tp_messages import StepMessage, all_ok, batch_of, broadcast_command
from research_rt.loader.resolve import ModelSource

logger = logging.getLogger(__name__)


def threads_per_rank(size: int) -> int:
    """The ranks share the machine's cores (oversubscribed OpenMP threads spin against each other)."""
    return max(1, (os.cpu_count() or 1) // size)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def restore(model: torch.nn.Module, backup: dict[str, torch.Tensor]) -> None:
    with torch.inference_mode():
        for name, p in model.named_parameters():
            p.data.copy_(backup[name])


class TPWorkerRunner(ModelRunner):
    """A rank's runner: joins the group before its first forward, then serves rank 0's steps."""

    def __init__(self, rank: int, port: int, args: Any, source: ModelSource, config: Any) -> None:
        self._port = port
        super().__init__(args, source, config, tp_rank=rank)

    def start_ranks(self) -> None:
        init_tp_group(self.plan.tp.rank, self.plan.tp.size, self._port, self.args.device)

    @torch.inference_mode()
    def run_step(self, msg: StepMessage) -> None:
        """The forward rank 0 runs for this step (its logits are rank 0's to sample)."""
        batch = batch_of(msg, self.kv_pool, self.attn_backend, self.device)
        if msg.compiled:
            self.graph_runner.run(batch)
            return
        hidden = self.model(batch.input_ids, batch.positions, batch)
        self.model.compute_logits(hidden[msg.logit_rows.to(hidden.device)])

    def serve(self) -> None:
        while True:
            kind, *payload = broadcast_command()
            if kind == "step":
                self.run_step(payload[0])
            elif kind == "update_disk":
                self._update(self.update_weights, payload)
            elif kind == "update_tensors":
                self._update(self.update_weights_from_tensors, payload)
            elif kind == "shutdown":
                return

    def _update(self, update, payload: list) -> None:
        """Kept only if every rank succeeded (rank 0 gathers the same verdict)."""
        backup = snapshot(self.model)
        try:
            update(*payload)
            error = None
        except Exception as e:  # noqa: BLE001 - reported to every rank
            error = str(e)
        if all_ok(error):
            restore(self.model, backup)


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(1.0)


def worker_main(rank: int, port: int, args: Any, source: ModelSource, config: Any, parent_pid: int) -> None:
    """The entry point of spawned rank `rank` (torch.multiprocessing)."""
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO))
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    torch.set_num_threads(threads_per_rank(args.tp_size))
    if str(args.device).startswith("cuda"):  # one GPU per rank (rank 0 keeps cuda:0)
        args = args.replace(device=f"cuda:{rank}")
    with torch.inference_mode():
        runner = TPWorkerRunner(rank, port, args, source, config)
    try:
        runner.serve()
    finally:
        destroy_tp_group()
