"""From the requests' intervention specs to one batch's per-row tensors, and back.

`build_interventions` maps each request's rows of the flat batch (a `Segment`: its first row and
the positions those rows hold) to the rows the decoder layers steer, ablate or read
(models/layers/intervention.py). After the forward, `collect_captures` hands each request what was
read at its rows (on the CPU, float32) into its `CaptureStore`; logit-lens rows go through the
model's final norm and LM head first, and return_hidden_states rows are read from the model's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from research_rt.core.interventions import (
    FINAL,
    LOGIT_LENS,
    CaptureStore,
    InterventionShape,
    InterventionSpec,
    Positions,
)
from research_rt.models.layers.intervention import BatchInterventions, Key


@dataclass
class Segment:
    """One request's rows of the flat batch: rows first_row.. hold positions start..start+length-1."""

    spec: InterventionSpec
    store: CaptureStore
    first_row: int
    start: int
    length: int


@dataclass
class Owner:
    """Which request gets rows offset..offset+count of what was read at a site."""

    store: CaptureStore
    key: Key  # where it goes in the store: (layer, site) as the request named it
    offset: int
    count: int
    positions: list[int]
    top_k: int = 0


@dataclass
class PlannedInterventions(BatchInterventions):
    owners: dict[Key, list[Owner]] = field(default_factory=dict)


def selected(positions: Positions, start: int, length: int) -> torch.Tensor:
    """Indices (into the segment) of the rows whose positions `positions` names."""
    if positions == "all":
        return torch.arange(length)
    if positions == "last":
        return torch.tensor([length - 1])
    pos = torch.arange(start, start + length)
    return torch.isin(pos, torch.tensor(positions, dtype=torch.int64)).nonzero().flatten()


def build_interventions(
    segments: list[Segment], shape: InterventionShape | None, device: torch.device, dtype: torch.dtype
) -> PlannedInterventions | None:
    if not segments:
        return None
    steer: dict[Key, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    capture: dict[Key, list[torch.Tensor]] = {}
    owners: dict[Key, list[Owner]] = {}
    heads: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    neurons: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def read(key: Key, seg: Segment, idx: torch.Tensor, out_key: Key, top_k: int = 0) -> None:
        rows = capture.setdefault(key, [])
        offset = sum(len(r) for r in rows)
        rows.append(seg.first_row + idx)
        positions = (seg.start + idx).tolist()
        owners.setdefault(key, []).append(Owner(seg.store, out_key, offset, len(idx), positions, top_k))

    for seg in segments:
        spec = seg.spec
        for s in spec.steer:
            idx = selected(s.positions, seg.start, seg.length)
            if len(idx):
                rows, deltas = steer.setdefault((s.layer, s.site), ([], []))
                rows.append(seg.first_row + idx)
                deltas.append(s.delta.expand(len(idx), -1))
        _ablations(seg, shape, heads, neurons)
        cap = spec.capture
        if cap is not None:
            idx = selected(cap.positions, seg.start, seg.length)
            for layer in cap.layers if len(idx) else ():
                for site in cap.sites:
                    hook = "resid_post" if site == LOGIT_LENS else site
                    read((layer, hook), seg, idx, (layer, site), cap.top_k if site == LOGIT_LENS else 0)
        if spec.hidden_states:
            read((None, FINAL), seg, torch.arange(seg.length), (None, FINAL))

    def cat(parts: list[torch.Tensor], dt: torch.dtype | None = None) -> torch.Tensor:
        return torch.cat(parts).to(device=device, dtype=dt)

    return PlannedInterventions(
        steer={k: (cat(r), cat(d, dtype)) for k, (r, d) in steer.items()},
        heads={k: (cat(r), cat(m)) for k, (r, m) in heads.items()},
        neurons={k: (cat(r), cat(m)) for k, (r, m) in neurons.items()},
        capture={k: cat(r) for k, r in capture.items()},
        owners=owners,
    )


def _ablations(seg: Segment, shape: InterventionShape | None, heads: dict, neurons: dict) -> None:
    """One drop mask per (layer, row) of the segment: entries on the same layer are merged."""
    masks: dict[tuple[str, int], torch.Tensor] = {}
    for a in seg.spec.ablate:
        idx = selected(a.positions, seg.start, seg.length)
        for kind, units in (("heads", a.heads), ("neurons", a.neurons)):
            if not units or not len(idx):
                continue
            assert shape is not None  # the front accepts ablations only for models with a shape
            width = shape.num_heads if kind == "heads" else shape.intermediate_sizes[a.layer]
            mask = masks.setdefault((kind, a.layer), torch.zeros(seg.length, width, dtype=torch.bool))
            mask[idx[:, None], torch.tensor(units)] = True
    for (kind, layer), mask in masks.items():
        idx = mask.any(dim=1).nonzero().flatten()
        rows, drops = (heads if kind == "heads" else neurons).setdefault(layer, ([], []))
        rows.append(seg.first_row + idx)
        drops.append(mask[idx])


@torch.inference_mode()
def collect_captures(iv: PlannedInterventions, hidden: torch.Tensor, model: torch.nn.Module) -> None:
    """Give each request its captured rows (`hidden`: the model's output, for return_hidden_states)."""
    for key, owners in iv.owners.items():
        rec = hidden[iv.capture[key]] if key == (None, FINAL) else iv.records.get(key)
        if rec is None:  # the model has no such site (a custom layer that does not call intervene)
            continue
        rows = rec.float().cpu()
        for o in owners:
            part = slice(o.offset, o.offset + o.count)
            if o.key[1] == LOGIT_LENS:
                logprobs = torch.log_softmax(model.logit_lens(rec[part]).float(), dim=-1)
                top = logprobs.topk(o.top_k, dim=-1)
                o.store.add(o.key, o.positions, (top.indices.cpu(), top.values.cpu()))
            else:
                o.store.add(o.key, o.positions, rows[part].clone())
