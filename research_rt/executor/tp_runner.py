"""Rank 0 of a tensor-parallel group: the ModelRunner the scheduler drives at --tp-size N.

Rank 0 owns the scheduler, the prefix cache and KV slot allocation. It spawns ranks 1..N-1
(torch.multiprocessing, tp_worker.py) with its own pool size, and before each forward broadcasts
the step's batch; every rank then runs the same forward over its shard (the collectives inside
meet), and rank 0 samples from the gathered logits. Weight updates reach every rank and are kept
only if every rank succeeded; `close` stops the ranks and reaps them.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch
import torch.multiprocessing as mp

from research_rt.core.forward_batch import ForwardBatch
from research_rt.distributed.group import destroy_tp_group, init_tp_group
from research_rt.executor.encoder_runner import EncoderRunner
from research_rt.executor.model_runner import ModelRunner
from research_rt.executor.tp_messages import all_ok, broadcast_command, step_message
from research_rt.executor.tp_worker import threads_per_rank, worker_main
from research_rt.loader.resolve import ModelSource

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPModelRunner(ModelRunner):
    """Rank 0's runner: same interface as ModelRunner, every call mirrored on the other ranks."""

    def __init__(self, args: Any, source: ModelSource, config: Any) -> None:
        if args.enable_interventions:
            raise ValueError("--enable-interventions needs --tp-size 1 (heads and neurons are sharded)")
        self._source, self._config, self._procs = source, config, []
        # every rank takes part in each compiled forward's all-reduces, the warm-up's too: compile
        # on all ranks at start-up, not in rank 0's background thread (graph_runner.py)
        args = args.replace(disable_background_compile=True)
        try:
            super().__init__(args, source, config, tp_rank=0)
        except BaseException:
            self._reap()
            raise

    def start_ranks(self) -> None:
        size, port = self.args.tp_size, free_port()
        # the ranks must agree on the pool: rank 0's sizes go to every rank
        rank_args = self.args.replace(
            max_total_tokens=self.max_total_num_tokens, max_running_requests=self.max_running_requests
        )
        ctx = mp.get_context("spawn")
        for rank in range(1, size):
            proc = ctx.Process(
                target=worker_main,
                args=(rank, port, rank_args, self._source, self._config, os.getpid()),
                daemon=True,
                name=f"research_rt-tp{rank}",
            )
            proc.start()
            self._procs.append(proc)
        torch.set_num_threads(threads_per_rank(size))
        init_tp_group(0, size, port, self.args.device)
        logger.info("Tensor parallel: %d ranks on %s (pids %s)", size, self.args.device, self.rank_pids())

    def rank_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def forward(self, batch: ForwardBatch, logit_rows: torch.Tensor):
        broadcast_command(("step", step_message(batch, logit_rows, self.runs_compiled(batch))))
        return super().forward(batch, logit_rows)

    def update_weights(self, source: ModelSource, load_format: str) -> None:
        update = super().update_weights
        self._everywhere(("update_disk", source, load_format), lambda: update(source, load_format))

    def update_weights_from_tensors(
        self, named: list[tuple[str, torch.Tensor]], direct: bool = False
    ) -> None:
        update = super().update_weights_from_tensors
        self._everywhere(("update_tensors", named, direct), lambda: update(named, direct))

    def _everywhere(self, command: tuple, update) -> None:
        """Run `update` here and `command` on every rank; raise unless all succeeded (each rank
        then restores its own weights; the caller restores rank 0's)."""
        broadcast_command(command)
        try:
            update()
            error = None
        except Exception as e:  # noqa: BLE001 - reported to every rank
            error = str(e)
        errors = all_ok(error)
        if errors:
            raise RuntimeError("; ".join(errors))

    def close(self, wait_for_compile: bool = True) -> None:
        """Stop ranks 1..N-1 and reap them (terminated if they do not exit in time); every rank
        compiled at start-up, so there is no compile to wait for."""
        if not self._procs:
            return
        try:
            broadcast_command(("shutdown",))
        except Exception:  # noqa: BLE001 - a rank already gone: reap what is left
            logger.exception("tensor parallel shutdown broadcast failed")
        self._reap()
        destroy_tp_group()

    def _reap(self) -> None:
        for proc in self._procs:
            proc.join(JOIN_TIMEOUT_S if proc.is_alive() else None)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._procs = []


def runner_class(is_encoder: bool, tp_size: int) -> type:
    """The runner for a model: encoders run at tp 1 only; decoders at tp > 1 get TPModelRunner."""
    if is_encoder:
        if tp_size > 1:
            raise ValueError("--tp-size > 1 supports decoder models only")
        return EncoderRunner
    return TPModelRunner if tp_size > 1 else ModelRunner
