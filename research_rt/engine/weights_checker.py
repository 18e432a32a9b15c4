"""The weights checker (`/weights_checker`, SGLang's): checksums of the live parameters, and a
snapshot to compare them against after a refit. Runs on the scheduler thread between steps.

Actions:
- checksum: a SHA-256 of every parameter's bytes (one per runtime tensor: a fused qkv or gate_up
  projection is one entry), and one over all of them (`per_gpu_checksum`, SGLang's name);
- snapshot: keep a copy of every parameter (in host memory);
- compare: whether every parameter equals the snapshot bit for bit (which ones differ, if not);
- reset_tensors: overwrite every parameter with random values (to test that a refit restores
  them; the prefix cache is flushed, its KV came from the old weights).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

ACTIONS = ("checksum", "snapshot", "compare", "reset_tensors")
PARALLELISM = {
    "tp_rank": 0,
    "tp_size": 1,
    "dp_rank": 0,
    "dp_size": 1,
    "pp_rank": 0,
    "pp_size": 1,
    "rank": 0,
    "size": 1,
}


def tensor_sha256(t: torch.Tensor) -> str:
    data = t.detach().contiguous().reshape(-1).cpu().view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


class WeightsChecker:
    def __init__(self) -> None:
        self._snapshot: dict[str, torch.Tensor] | None = None

    def handle(
        self, model: torch.nn.Module, action: str, load: Callable[..., None]
    ) -> tuple[bool, str, dict[str, Any] | None]:
        """(success, message, payload: the checksums for `checksum`, else None). `load(named,
        direct=True)` writes parameters (the runner's update from tensors)."""
        params = dict(model.named_parameters())
        if action == "checksum":
            sums = {name: tensor_sha256(p) for name, p in params.items()}
            overall = hashlib.sha256()
            for name in sorted(sums):
                overall.update(name.encode())
                overall.update(sums[name].encode())
            payload = {
                "checksums": sums,
                "per_gpu_checksum": overall.hexdigest(),
                "parallelism_info": PARALLELISM,
            }
            return True, f"Checksums of {len(sums)} tensors.", payload
        if action == "snapshot":
            self._snapshot = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
            return True, f"Snapshot of {len(params)} tensors taken.", None
        if action == "compare":
            return self._compare(params)
        if action == "reset_tensors":
            gen = torch.Generator().manual_seed(0)
            load(
                [(n, torch.rand(p.shape, generator=gen).to(p.dtype)) for n, p in params.items()], direct=True
            )
            return True, f"Reset {len(params)} tensors to random values.", None
        return False, f"Field 'action' must be one of {', '.join(ACTIONS)}, got {action!r}.", None

    def _compare(self, params: dict[str, torch.Tensor]) -> tuple[bool, str, None]:
        if self._snapshot is None:
            return (
                False,
                "No snapshot to compare against: call the checker with action 'snapshot' first.",
                None,
            )
        if set(params) != set(self._snapshot):
            return False, "The model's tensors are not those of the snapshot.", None
        differ = []
        for name, p in params.items():
            ref = self._snapshot[name]
            if not torch.equal(p.detach().cpu(), ref):
                err = (p.detach().cpu().float() - ref.float()).abs().max().item()
                differ.append(f"{name} (max abs diff {err:.3g})")
        if differ:
            return (
                False,
                f"{len(differ)} of {len(params)} tensors differ from the snapshot: " + ", ".join(differ),
                None,
            )
        return True, f"All {len(params)} tensors equal the snapshot.", None
