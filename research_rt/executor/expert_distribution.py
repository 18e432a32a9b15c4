"""Expert-distribution recording: how many tokens each MoE layer routed to each expert.

The ModelRunner owns one recorder and hands it to MoE layers through `ForwardBatch.expert_recorder`
while recording (None otherwise), so nothing global is involved. Counts are the top-k choices:
per layer they sum to (tokens forwarded) x top_k. The dump is SGLang's v0.4.5 CSV
(`expert_distribution_rank0_timestamp<time>.csv`, header `layer_id,expert_id,count`).
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class ExpertDistributionRecorder:
    def __init__(self, moe_layer_ids: list[int], num_experts: int) -> None:
        self.moe_layer_ids = list(moe_layer_ids)
        self.num_experts = num_experts
        self._row = {layer: i for i, layer in enumerate(self.moe_layer_ids)}
        self.counts = torch.zeros(len(self.moe_layer_ids), num_experts, dtype=torch.int64)
        self.recording = False

    def start(self) -> None:
        if self.recording:
            logger.warning("SGLang server is already recording expert ids. Did you forget to dump?")
        self.reset()
        self.recording = True

    def stop(self) -> None:
        if not self.recording:
            logger.warning("SGLang server has not been recording expert ids. Did you forget to start?")
        self.recording = False

    def reset(self) -> None:
        self.counts.zero_()

    def record(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        """Count one MoE layer's routing decisions (topk_ids [T, k])."""
        if not self.recording:
            return
        hist = torch.bincount(topk_ids.reshape(-1).cpu(), minlength=self.num_experts)
        self.counts[self._row[layer_id]] += hist

    def dump(self, directory: Path | str = ".") -> Path:
        """Write the CSV into `directory` and reset the counts; return the file's path."""
        path = Path(directory) / f"expert_distribution_rank0_timestamp{time.time()}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer_id", "expert_id", "count"])
            for row, layer in enumerate(self.moe_layer_ids):
                for expert in range(self.num_experts):
                    writer.writerow([layer, expert, int(self.counts[row, expert])])
        logger.info("Dumped the expert distribution to %s", path)
        self.reset()
        return path
