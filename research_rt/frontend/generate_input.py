"""The request a user sends to `/generate` (or `Engine.generate`), normalised and validated.

Its shape is worked out once (`prompts()`, cached): one prompt per batch item, and whether the
caller gets one response object or a list (`single_response`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from research_rt.core.errors import RequestError


@dataclass
class GenerateInput:
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    input_embeds: Any = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    token_ids_logprob: list[int] | list[list[int]] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    return_hidden_states: bool = False
    log_metrics: bool = True
    custom_logit_processor: str | None = None
    logit_processor: Any = None  # offline Engine only: a Python callable(logits_row, req)
    # interventions (frontend/interventions.py; need --enable-interventions)
    capture: dict[str, Any] | list[dict[str, Any] | None] | None = None
    steer: list[Any] | None = None
    ablate: list[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _parsed: tuple[list[Any], bool] | None = field(default=None, init=False, repr=False, compare=False)

    # ---------------------------------------------------------------- shape
    def prompts(self) -> tuple[list[Any], bool]:
        """(one prompt per batch item, whether the request was a single one); parsed once."""
        if self._parsed is None:
            self._parsed = self._parse_prompts()
        return self._parsed

    @property
    def single_response(self) -> bool:
        """One response object (not a list): a single prompt, n == 1, sampling_params not a list."""
        _, single = self.prompts()
        sp = self.sampling_params
        n = sp.get("n", 1) if isinstance(sp, dict) else 1
        return single and n == 1 and not isinstance(sp, list)

    def _parse_prompts(self) -> tuple[list[Any], bool]:
        if self.input_embeds is not None:
            raise RequestError("input_embeds is not supported by research_rt.")
        if self.text is not None and self.input_ids is not None:
            raise RequestError("text and input_ids cannot be provided at the same time.")
        if self.text is None and self.input_ids is None:
            raise RequestError("Either text, input_ids or input_embeds should be provided.")
        if self.text is not None:
            if isinstance(self.text, str):
                return [self.text], True
            if not isinstance(self.text, list) or not all(isinstance(t, str) for t in self.text):
                raise RequestError("text must be a string or a list of strings.")
            if not self.text:
                raise RequestError("text cannot be an empty list.")
            return list(self.text), False
        ids = self.input_ids
        if not isinstance(ids, list):
            raise RequestError("input_ids must be a list of token ids or a list of such lists.")
        if not ids:
            raise RequestError("input_ids cannot be empty.")
        if all(_is_int(i) for i in ids):
            return [list(ids)], True
        if all(isinstance(x, list) and all(_is_int(i) for i in x) for x in ids):
            return [list(x) for x in ids], False
        raise RequestError("input_ids must be a list of token ids or a list of such lists.")

    def per_item(self, name: str, index: int, batch_size: int) -> Any:
        """A field that may be given once for the batch or as a list, one per item."""
        value = getattr(self, name)
        if (
            isinstance(value, list)
            and name not in ("token_ids_logprob",)
            or (
                name == "token_ids_logprob"
                and isinstance(value, list)
                and value
                and isinstance(value[0], list)
            )
        ):
            if len(value) != batch_size:
                raise RequestError(f"{name} has {len(value)} entries for a batch of {batch_size}.")
            return value[index]
        return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
