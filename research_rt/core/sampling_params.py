"""Sampling parameters: SGLang's names, defaults, normalisation and error texts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

TOP_K_ALL = 1 << 30
_GRAMMAR_KEYS = ("regex", "json_schema", "ebnf")


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
        """SGLang's normalisation: temperature ~0 means greedy; top_k -1 means all; stop -> list."""
        if 0 <= self.temperature < 1e-6:
            self.temperature = 1.0
            self.top_k = 1
        if self.top_k == -1:
            self.top_k = TOP_K_ALL
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        return self

    @property
    def is_greedy(self) -> bool:
        return self.top_k == 1

    def verify(self) -> None:
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
