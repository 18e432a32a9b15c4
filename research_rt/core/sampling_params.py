"""Sampling parameters: SGLang's names, defaults, normalisation and error texts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

TOP_K_ALL = 1 << 30
_GRAMMAR_KEYS = ("regex", "json_schema", "ebnf")

# Limits (README "Limits and errors"); verify() answers each with a message naming it.
MAX_N = 256  # samples per prompt
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 1024
SEED_RANGE = (-(1 << 63), 1 << 63)  # what torch.Generator.manual_seed takes, less room for n's offsets
# The sampler divides positive logits by repetition_penalty: below this they overflow float32 (0 gives
# inf, then NaN probabilities), so normalize() raises smaller values to it (the same limit, finite).
MIN_REPETITION_PENALTY = 1e-6
_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)


@dataclass
class SamplingParams:
    max_new_tokens: int | None = 128
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    custom_params: dict[str, Any] | None = None
    sampling_seed: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a request dict; unknown keys and wrong types raise ValueError naming the field."""
        d = dict(d or {})
        if "seed" in d and "sampling_seed" not in d:
            d["sampling_seed"] = d.pop("seed")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"Unknown sampling parameter(s): {', '.join(unknown)}.")
        for key, value in d.items():
            _check_type(key, value, names[key].type)
        return cls(**d)

    def normalize(self) -> SamplingParams:
        """SGLang's normalisation: temperature ~0 means greedy; top_k -1 means all; stop -> list.

        Also: a top_k above TOP_K_ALL means all too (it becomes an int64 tensor), and a
        repetition_penalty below MIN_REPETITION_PENALTY (0 is valid) is raised to it."""
        if 0 <= self.temperature < 1e-6:
            self.temperature = 1.0
            self.top_k = 1
        if self.top_k == -1 or self.top_k > TOP_K_ALL:
            self.top_k = TOP_K_ALL
        if 0 <= self.repetition_penalty < MIN_REPETITION_PENALTY:
            self.repetition_penalty = MIN_REPETITION_PENALTY
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        return self

    @property
    def is_greedy(self) -> bool:
        return self.top_k == 1

    def verify(self) -> None:
        for key in _FLOAT_FIELDS:
            value = getattr(self, key)
            if not _finite_float32(value):
                raise ValueError(not_finite_message(f"sampling_params.{key}", value))
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k < 1 and self.top_k != -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not 0.0 <= self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in [0, 2], got {self.repetition_penalty}.")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}.")
        if self.max_new_tokens is not None:
            if self.max_new_tokens < 0:
                raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
            if self.min_new_tokens > self.max_new_tokens:
                raise ValueError(
                    f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], "
                    f"got {self.min_new_tokens}."
                )
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.n > MAX_N:
            raise ValueError(f"n must be at most {MAX_N}, got {self.n}.")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(
                f"sampling_params.stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}."
            )
        longest = max((len(s) for s in stops), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise ValueError(
                f"sampling_params.stop strings may be at most {MAX_STOP_STRING_CHARS} characters long, "
                f"got one of {longest}."
            )
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"sampling_params.stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, "
                f"got {len(self.stop_token_ids)}."
            )
        if self.sampling_seed is not None and not SEED_RANGE[0] <= self.sampling_seed < SEED_RANGE[1]:
            raise ValueError(
                f"sampling_params.sampling_seed (seed) must be in [-2**63, 2**63), got {self.sampling_seed!r:.60}."
            )
        if sum(getattr(self, k) is not None for k in _GRAMMAR_KEYS) > 1:
            raise ValueError("Only one of regex, json_schema, or ebnf can be set.")
        if self.structural_tag is not None:
            raise ValueError("structural_tag is not supported by research_rt (regex, json_schema, ebnf are).")


def _check_type(key: str, value: Any, annotation: str) -> None:
    if value is None:
        if "None" not in annotation:
            raise ValueError(f"sampling_params.{key} must not be null.")
        return
    ok: bool
    if annotation.startswith("bool"):
        ok = isinstance(value, bool)
    elif annotation.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not _finite_float32(value):
            raise ValueError(not_finite_message(f"sampling_params.{key}", value))
    elif annotation.startswith("str | list[str]"):
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))
    elif annotation.startswith("list[int]"):
        ok = isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    elif annotation.startswith("str"):
        ok = isinstance(value, str)
    elif annotation.startswith("dict"):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ValueError(f"sampling_params.{key} has the wrong type: {type(value).__name__} ({value!r:.60}).")


def _finite_float32(value: Any) -> bool:
    """Whether a number becomes a finite float32 (what the sampler's tensors hold)."""
    try:
        f = float(value)
    except (OverflowError, TypeError, ValueError):  # an int too large for a float
        return False
    return math.isfinite(f) and abs(f) <= _FLOAT32_MAX


def describe_number(value: Any) -> str:
    """A number as JSON would spell it: NaN, Infinity, -Infinity; long ints cut short."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def not_finite_message(field: str, value: Any) -> str:
    try:
        big = math.isfinite(float(value))
    except (OverflowError, TypeError, ValueError):
        big = True
    beyond = " (beyond float32's range)" if big else ""
    return f"{field} must be a finite number, got {describe_number(value)}{beyond}."
