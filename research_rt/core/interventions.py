"""A request's interventions (what to capture, steer and ablate inside the model), once validated,
and the store its captured activations accumulate in.

The front parses `/generate`'s `capture`, `steer` and `ablate` fields into an `InterventionSpec`
(frontend/interventions.py); the runner turns the specs of a batch's requests into per-row tensors
(executor/interventions.py) that the decoder layers apply (models/layers/intervention.py).
Positions count over prompt and output tokens together: position 0 is the first prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# where a decoder layer's activations can be read or changed, in the order the layer computes them
SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
LOGIT_LENS = "logit_lens"  # capture only: resid_post through the final norm and LM head, top-k
CAPTURE_SITES = (*SITES, LOGIT_LENS)
FINAL = "final"  # the model's last hidden state (after the final norm): return_hidden_states

Positions = str | tuple[int, ...]  # "all" | "last" (capture only) | explicit positions


@dataclass(frozen=True)
class InterventionShape:
    """What a model offers to interventions: its sizes, and per layer the dense MLP width (0 for a
    mixture-of-experts layer, whose neurons cannot be ablated)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_sizes: tuple[int, ...]
    vocab_size: int


@dataclass(frozen=True)
class CaptureSpec:
    layers: tuple[int, ...]
    sites: tuple[str, ...]
    positions: Positions = "all"
    format: str = "base64"  # "base64" (little-endian float32) | "list"
    top_k: int = 5  # logit_lens tokens per position


@dataclass(frozen=True)
class SteerSpec:
    layer: int
    site: str
    delta: torch.Tensor  # scale * vector, float32 [hidden]
    positions: Positions = "all"


@dataclass(frozen=True)
class AblateSpec:
    layer: int
    heads: tuple[int, ...] = ()
    neurons: tuple[int, ...] = ()
    positions: Positions = "all"


@dataclass(frozen=True)
class InterventionSpec:
    capture: CaptureSpec | None = None
    steer: tuple[SteerSpec, ...] = ()
    ablate: tuple[AblateSpec, ...] = ()
    hidden_states: bool = False  # return_hidden_states: the final hidden state at every position

    @property
    def changes_kv(self) -> bool:
        """Whether the request's activations (and so its KV) differ from a plain run's."""
        return bool(self.steer or self.ablate)

    def max_cached_prefix(self) -> int | None:
        """How many leading tokens may come from the prefix cache (None: no limit): none for a
        request that changes activations or captures every position, else up to its first
        explicitly captured position (those must be computed to be captured)."""
        if self.changes_kv or self.hidden_states:
            return 0
        cap = self.capture
        if cap is None or cap.positions == "last":
            return None
        if cap.positions == "all":
            return 0
        return min(cap.positions)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CapturedEntry:
    """One (layer, site) of a finished request: `data` [P, hidden] float32 rows at `positions`, or
    for the logit lens [P, k] log-probabilities with their `token_ids`."""

    layer: int
    site: str
    positions: list[int]
    data: torch.Tensor
    format: str
    token_ids: torch.Tensor | None = None


@dataclass
class CaptureStore:
    """A request's captured rows by (layer, site) and position. A recomputed position (after a
    retraction) overwrites its row; with `"positions": "last"` only the latest position is kept."""

    last_only: bool = False
    rows: dict[tuple[int | None, str], dict[int, Any]] = field(default_factory=dict)

    def add(self, key: tuple[int | None, str], positions: list[int], values: Any) -> None:
        """`values` [n, ...] (or a tuple of such tensors) for `positions`, on the CPU."""
        by_pos = self.rows.setdefault(key, {})
        if self.last_only and key[1] != FINAL:
            newest = max(positions)
            if by_pos and max(by_pos) > newest:
                return
            by_pos.clear()
            i = positions.index(newest)
            by_pos[newest] = tuple(v[i] for v in values) if isinstance(values, tuple) else values[i]
            return
        for i, p in enumerate(positions):
            by_pos[p] = tuple(v[i] for v in values) if isinstance(values, tuple) else values[i]

    def entries(self, spec: CaptureSpec) -> tuple[CapturedEntry, ...]:
        out = []
        for layer in spec.layers:
            for site in spec.sites:
                by_pos = self.rows.get((layer, site), {})
                positions = sorted(by_pos)
                if site == LOGIT_LENS:
                    k = spec.top_k
                    ids = torch.stack([by_pos[p][0] for p in positions]) if positions else torch.empty(0, k)
                    lps = torch.stack([by_pos[p][1] for p in positions]) if positions else torch.empty(0, k)
                    out.append(CapturedEntry(layer, site, positions, lps, spec.format, ids.long()))
                    continue
                data = torch.stack([by_pos[p] for p in positions]) if positions else torch.empty(0)
                out.append(CapturedEntry(layer, site, positions, data, spec.format))
        return tuple(out)

    def hidden_states(self, prompt_len: int) -> list[Any]:
        """SGLang's layout: the prefill block [prompt_len][hidden], then one vector per decode step."""
        by_pos = self.rows.get((None, FINAL), {})
        prefill = [by_pos[p].tolist() for p in range(prompt_len) if p in by_pos]
        out: list[Any] = [prefill] if prefill else []
        out.extend(by_pos[p].tolist() for p in sorted(by_pos) if p >= prompt_len)
        return out
