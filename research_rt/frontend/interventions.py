"""`/generate`'s `capture`, `steer` and `ablate` fields (and `return_hidden_states`) -> a validated
`InterventionSpec`, or a `RequestError` (400) that names the field and what was wrong.

Only declared data crosses the wire: layer and unit numbers, site names, positions and float
vectors (a JSON list, or base64 of little-endian float32). Nothing is evaluated.

    capture: {"layers": [..] | "all", "sites": [..], "positions": "all" | "last" | [..],
              "format": "base64" | "list", "top_k": 5}
    steer:   [{"layer", "site", "vector", "scale": 1.0, "positions": "all" | [..]}]
    ablate:  [{"layer", "heads": [..]} | {"layer", "neurons": [..]}]  (optional "positions")

For a batch, `capture` may be a list (one object or null per prompt), and `steer` / `ablate` a
list of lists (one list or null per prompt); otherwise one value applies to every prompt.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
import torch

from research_rt.core.errors import RequestError
from research_rt.core.interventions import (
    CAPTURE_SITES,
    LOGIT_LENS,
    SITES,
    AblateSpec,
    CaptureSpec,
    InterventionShape,
    InterventionSpec,
    SteerSpec,
)

DISABLED = (
    "Interventions (capture, steer, ablate) are disabled on this server; start it with "
    "--enable-interventions (ServerArgs.enable_interventions)."
)
HIDDEN_STATES_DISABLED = (
    "return_hidden_states=True requires the server to be started with --enable-return-hidden-states "
    "(ServerArgs.enable_return_hidden_states)."
)
UNSUPPORTED = "This model does not support interventions (only the decoder models in research_rt.models do)."
CAPTURE_KEYS = ("layers", "sites", "positions", "format", "top_k")
STEER_KEYS = ("layer", "site", "vector", "scale", "positions")
ABLATE_KEYS = ("layer", "heads", "neurons", "positions")
MAX_TOP_K = 100


def for_item(value: Any, batched_when: type, index: int, batch_size: int, name: str) -> Any:
    """The value of an intervention field for prompt `index`: per prompt when the field is a list
    of `batched_when` (or nulls), else the same for all."""
    if isinstance(value, list) and value and all(v is None or isinstance(v, batched_when) for v in value):
        if len(value) != batch_size:
            raise RequestError(f"{name} has {len(value)} entries for a batch of {batch_size}.")
        return value[index]
    return value


class InterventionParser:
    def __init__(self, args, shape: InterventionShape | None) -> None:
        self.args = args
        self.shape = shape

    def parse(
        self, capture: Any, steer: Any, ablate: Any, hidden_states: bool, prompt_len: int, max_new_tokens: int
    ) -> InterventionSpec | None:
        """The spec of one request whose last computed position is prompt_len + max_new_tokens - 2."""
        if hidden_states and not self.args.enable_return_hidden_states:
            raise RequestError(HIDDEN_STATES_DISABLED)
        asked = capture is not None or bool(steer) or bool(ablate)
        if asked and not self.args.enable_interventions:
            raise RequestError(DISABLED)
        if not asked and not hidden_states:
            return None
        if asked and self.shape is None:
            raise RequestError(UNSUPPORTED)
        fields = _Fields(self.shape, prompt_len - 1 + max(max_new_tokens - 1, 0))  # type: ignore[arg-type]
        spec = InterventionSpec(
            capture=None if capture is None else fields.capture(capture),
            steer=tuple(fields.steer(e, f"steer[{i}]") for i, e in enumerate(_entries(steer, "steer"))),
            ablate=tuple(fields.ablate(e, f"ablate[{i}]") for i, e in enumerate(_entries(ablate, "ablate"))),
            hidden_states=bool(hidden_states),
        )
        if spec.capture is not None:
            fields.check_size(spec.capture, self.args.intervention_max_capture_bytes)
        return spec


class _Fields:
    """Validation of one request's fields; `last_pos` is the last position it computes."""

    def __init__(self, shape: InterventionShape, last_pos: int) -> None:
        self.shape = shape
        self.last_pos = last_pos

    def capture(self, d: Any) -> CaptureSpec:
        _check_keys(d, CAPTURE_KEYS, "capture")
        layers = d.get("layers")
        if layers == "all":
            layers = list(range(self.shape.num_layers))
        if not isinstance(layers, list) or not layers:
            raise RequestError('capture.layers must be a non-empty list of layer numbers or "all".')
        sites = d.get("sites", ["resid_post"])
        if not isinstance(sites, list) or not sites:
            raise RequestError("capture.sites must be a non-empty list of site names.")
        for site in sites:
            _check_site(site, CAPTURE_SITES, "capture.sites")
        fmt = d.get("format", "base64")
        if fmt not in ("base64", "list"):
            raise RequestError(f'capture.format must be "base64" or "list", got {fmt!r}.')
        top_k = d.get("top_k", 5)
        if not _is_int(top_k) or not 1 <= top_k <= min(MAX_TOP_K, self.shape.vocab_size):
            raise RequestError(f"capture.top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}.")
        return CaptureSpec(
            layers=tuple(dict.fromkeys(self.layer(n, "capture.layers") for n in layers)),
            sites=tuple(dict.fromkeys(sites)),
            positions=self.positions(d.get("positions", "all"), "capture.positions", allow_last=True),
            format=fmt,
            top_k=top_k,
        )

    def steer(self, d: Any, name: str) -> SteerSpec:
        _check_keys(d, STEER_KEYS, name)
        layer = self.layer(d.get("layer"), f"{name}.layer")
        site = d.get("site", "resid_post")
        _check_site(site, SITES, f"{name}.site")
        scale = d.get("scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise RequestError(f"{name}.scale must be a finite number, got {scale!r}.")
        vector = self.vector(d.get("vector"), f"{name}.vector")
        positions = self.positions(d.get("positions", "all"), f"{name}.positions", allow_last=False)
        return SteerSpec(layer, site, vector * float(scale), positions)

    def ablate(self, d: Any, name: str) -> AblateSpec:
        _check_keys(d, ABLATE_KEYS, name)
        layer = self.layer(d.get("layer"), f"{name}.layer")
        heads, neurons = d.get("heads"), d.get("neurons")
        if (heads is None) == (neurons is None):
            raise RequestError(f'{name} must name either "heads" or "neurons" (one of them).')
        kind, units = ("heads", heads) if heads is not None else ("neurons", neurons)
        width = self.shape.num_heads if kind == "heads" else self.shape.intermediate_sizes[layer]
        if kind == "neurons" and width == 0:
            raise RequestError(
                f"{name}: layer {layer} has no dense MLP (mixture of experts); neurons cannot be ablated there."
            )
        if not isinstance(units, list) or not units or not all(_is_int(u) for u in units):
            raise RequestError(f"{name}.{kind} must be a non-empty list of integers.")
        bad = next((u for u in units if not 0 <= u < width), None)
        if bad is not None:
            raise RequestError(
                f"{name}.{kind}: {bad} is out of range; layer {layer} has {width} {kind} (0..{width - 1})."
            )
        positions = self.positions(d.get("positions", "all"), f"{name}.positions", allow_last=False)
        units = tuple(sorted(set(units)))
        return AblateSpec(
            layer, units if kind == "heads" else (), units if kind == "neurons" else (), positions
        )

    # ---------------------------------------------------------------- values
    def layer(self, n: Any, name: str) -> int:
        count = self.shape.num_layers
        if not _is_int(n):
            raise RequestError(f"{name} must be an integer layer number, got {n!r}.")
        if not 0 <= n < count:
            raise RequestError(
                f"{name}: layer {n} is out of range; the model has {count} layers (0..{count - 1})."
            )
        return n

    def positions(self, value: Any, name: str, allow_last: bool) -> str | tuple[int, ...]:
        if value == "all" or (allow_last and value == "last"):
            return value
        words = '"all", "last"' if allow_last else '"all"'
        if not isinstance(value, list) or not value or not all(_is_int(p) for p in value):
            raise RequestError(f"{name} must be {words} or a non-empty list of positions.")
        bad = next((p for p in value if not 0 <= p <= self.last_pos), None)
        if bad is not None:
            raise RequestError(
                f"{name}: position {bad} is out of range; this request computes positions 0..{self.last_pos} "
                "(prompt and output tokens together)."
            )
        return tuple(sorted(set(value)))

    def vector(self, value: Any, name: str) -> torch.Tensor:
        size = self.shape.hidden_size
        if isinstance(value, str):
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as e:
                raise RequestError(f"{name} is not valid base64: {e}.") from e
            if len(raw) != 4 * size:
                raise RequestError(
                    f"{name} has {len(raw)} bytes; base64 vectors are little-endian float32, "
                    f"{4 * size} bytes for the model's hidden size {size}."
                )
            vec = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            if len(value) != size:
                raise RequestError(f"{name} has {len(value)} values; the model's hidden size is {size}.")
            vec = np.asarray(value, dtype=np.float32)
        else:
            raise RequestError(f"{name} must be a list of numbers or a base64 string of float32.")
        if not np.isfinite(vec).all():
            raise RequestError(f"{name} has a value that is not a finite float32.")
        return torch.from_numpy(vec.copy())

    def check_size(self, cap: CaptureSpec, limit: int) -> None:
        if cap.positions == "all":
            n = self.last_pos + 1
        else:
            n = 1 if cap.positions == "last" else len(cap.positions)
        per_layer = sum(8 * cap.top_k if s == LOGIT_LENS else 4 * self.shape.hidden_size for s in cap.sites)
        total = n * len(cap.layers) * per_layer
        if total > limit:
            raise RequestError(
                f"capture would return up to {total} bytes ({n} positions x {len(cap.layers)} layers x "
                f"{len(cap.sites)} sites), over this server's limit of {limit} bytes per request "
                "(--intervention-max-capture-bytes); capture fewer layers, sites or positions, or lower "
                "max_new_tokens."
            )


def _entries(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"{name} must be a list of objects.")
    return value


def _check_keys(d: Any, allowed: tuple[str, ...], name: str) -> None:
    if not isinstance(d, dict):
        raise RequestError(f"{name} must be an object.")
    unknown = next((k for k in d if k not in allowed), None)
    if unknown is not None:
        raise RequestError(f"Unknown key {unknown!r} in {name}; expected {', '.join(allowed)}.")


def _check_site(site: Any, allowed: tuple[str, ...], name: str) -> None:
    if site not in allowed:
        raise RequestError(f"{name}: unknown site {site!r}; expected one of {', '.join(allowed)}.")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
