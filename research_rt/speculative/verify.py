"""The verify forward: every row is a request's last token followed by exactly k drafts (rows
with fewer drafts are padded with their last token), as an EXTEND over the KV pool.

With torch.compile on, the step is compiled once per shape family (batch 1; batch 2+ dynamic),
the key length padded to a multiple of KV_ALIGN and marked dynamic, as the decode step is
(executor/graph_runner.py): an eager verify at batch 1 costs more than the tokens it saves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from research_rt.core.forward_batch import ForwardBatch, ForwardMode
from research_rt.executor.graph_runner import KV_ALIGN, MAX_DYNAMIC_BATCH
from research_rt.executor.module_call_lock import inductor_under_lock

logger = logging.getLogger(__name__)


class VerifyRunner:
    """Logits for every position of a fixed-width verify batch (eager or compiled)."""

    def __init__(self, runner, width: int, compile_step: bool) -> None:
        self.runner = runner
        self.width = width  # k + 1 tokens per row
        self.compiled: Callable[..., torch.Tensor] | None = None
        if compile_step:
            self.compiled = torch.compile(
                self._step,
                backend=inductor_under_lock,
                dynamic=None,
                fullgraph=True,
                isolate_recompiles=True,  # one set of entries per runner (graph_runner.py)
                recompile_limit=8,
            )
        self.seen: set[int] = set()

    def _step(self, input_ids, positions, out_cache_loc, kv_indices, attn_mask) -> torch.Tensor:
        runner = self.runner
        bs = kv_indices.shape[0]
        n = input_ids.shape[0]
        flat = torch.arange(n, device=input_ids.device)
        meta = runner.attn_backend.from_tensors(
            {
                "kv_indices": kv_indices,
                "attn_mask": attn_mask,
                "q_gather": flat.view(bs, -1),
                "q_scatter": flat,
            }
        )
        batch = ForwardBatch(
            mode=ForwardMode.EXTEND,
            batch_size=bs,
            input_ids=input_ids,
            positions=positions,
            out_cache_loc=out_cache_loc,
            attn_metadata=meta,
            kv_pool=runner.kv_pool,
            attn_backend=runner.attn_backend,
        )
        hidden = runner.model(input_ids, positions, batch)
        return runner.model.compute_logits(hidden)

    @torch.inference_mode()
    def run(self, rows: torch.Tensor, kv_lens: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """Logits [B * width, V] (float32, CPU) for requests in req_to_token rows `rows`, each with
        `kv_lens[b]` cached tokens and its `width` input tokens `tokens[b]` (their KV slots are
        already in the row at kv_lens[b]..)."""
        runner = self.runner
        width, bs = self.width, len(kv_lens)
        table = runner.req_to_token.table
        lk = max(kv_lens) + width
        padded = -(-lk // KV_ALIGN) * KV_ALIGN if self.compiled is not None else lk
        meta = runner.attn_backend.build_metadata(ForwardMode.EXTEND, kv_lens, [width] * bs, table[rows, :lk])
        kv_indices = F.pad(meta.kv_indices, (0, padded - meta.kv_indices.shape[1]))
        mask = F.pad(meta.attn_mask, (0, padded - meta.attn_mask.shape[3]))
        offsets = torch.arange(width)
        pos = (torch.tensor(kv_lens)[:, None] + offsets[None, :]).flatten()
        loc = table[rows[:, None], pos.view(bs, width)].flatten()
        device = runner.device
        inputs = {
            "input_ids": torch.tensor(tokens, dtype=torch.int64).flatten().to(device),
            "positions": pos.to(device),
            "out_cache_loc": loc.to(device),
            "kv_indices": kv_indices.to(device),
            "attn_mask": mask.to(device),
        }
        if self.compiled is None:
            return self._step(**inputs).float().cpu()
        torch._dynamo.mark_dynamic(inputs["kv_indices"], 1)
        torch._dynamo.mark_dynamic(inputs["attn_mask"], 3)
        if bs > 1:
            for value in inputs.values():
                torch._dynamo.mark_dynamic(value, 0, min=2, max=MAX_DYNAMIC_BATCH * width)
        key = min(bs, 2)
        t0 = time.monotonic()
        out = self.compiled(**inputs)
        if key not in self.seen:
            self.seen.add(key)
            logger.info(
                "Compiled the verify step (batch %s) in %.1f s",
                "1" if key == 1 else "2+",
                time.monotonic() - t0,
            )
        return out.float().cpu()
