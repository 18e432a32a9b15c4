"""Per-request interventions inside a forward: the one place the decoder layers call.

A layer passes each activation it computes through `intervene(batch, layer_id, site, x)`, its
attention output (before `o_proj`) through `ablate_heads` and its MLP's hidden activation (before
`down_proj`) through `ablate_neurons`. With `batch.interventions is None` (every batch whose
requests ask for nothing, the compiled decode step included) each returns its input untouched.
Otherwise `batch.interventions` holds per-row tensors, built by the runner from the requests'
specs (executor/interventions.py): only the rows of requests that asked are changed or read, out
of place, so other rows of the batch stay bit for bit what they would be without.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from research_rt.core.forward_batch import ForwardBatch

Key = tuple[int | None, str]  # (layer, site); (None, "final") is the model's output


@dataclass
class BatchInterventions:
    """One batch's interventions as flat-row tensors (rows index the batch's tokens)."""

    steer: dict[Key, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # rows, deltas [n, H]
    heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # rows, drop [n, heads]
    neurons: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # rows, drop [n, I]
    capture: dict[Key, torch.Tensor] = field(default_factory=dict)  # rows to read at that site
    records: dict[Key, torch.Tensor] = field(default_factory=dict)  # what was read, filled by the forward


def intervene(batch: ForwardBatch, layer_id: int, site: str, x: torch.Tensor) -> torch.Tensor:
    """Add the steering deltas of (layer_id, site) to their rows, then record the captured rows."""
    iv = batch.interventions
    if iv is None:
        return x
    key = (layer_id, site)
    steer = iv.steer.get(key)
    if steer is not None:
        rows, deltas = steer
        x = x.index_add(0, rows, deltas.to(x.dtype))
    rows = iv.capture.get(key)
    if rows is not None:
        iv.records[key] = x[rows]
    return x


def ablate_heads(batch: ForwardBatch, layer_id: int, o: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Zero the dropped heads' outputs `o` [T, heads * head_dim] in their rows."""
    iv = batch.interventions
    if iv is None or layer_id not in iv.heads:
        return o
    rows, drop = iv.heads[layer_id]
    picked = o[rows].view(len(rows), num_heads, -1).masked_fill(drop[:, :, None], 0)
    return o.index_put((rows,), picked.view(len(rows), -1))


def ablate_neurons(batch: ForwardBatch | None, layer_id: int, h: torch.Tensor) -> torch.Tensor:
    """Zero the dropped MLP neurons of `h` [T, intermediate] (the input of down_proj) in their rows."""
    iv = None if batch is None else batch.interventions
    if iv is None or layer_id not in iv.neurons:
        return h
    rows, drop = iv.neurons[layer_id]
    return h.index_put((rows,), h[rows].masked_fill(drop, 0))
