"""The request a user sends to `/generate` (or `Engine.generate`), normalised and validated.

Its shape is worked out once (`prompts()`, cached): one prompt per batch item, and whether the
caller gets one response object or a list (`single_response`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from research_rt.core.errors import RequestError

# ---------------------------------------------------------------- limits (README "Limits and errors")
# What one request may ask for. Each is enforced with a 400 naming the field and the limit, before any
# work that grows with it (tokenizing, building requests) runs on the server's event loop.
MAX_BATCH_SIZE = 1024  # prompts in one request (a list of texts or of token-id lists)
MAX_REQUESTS = 1024  # prompts x n: the requests one call may start
MAX_TEXT_CHARS = 1 << 22  # characters of prompt text in one call (tokenized on the event loop)
MAX_TOKEN_IDS_LOGPROB = 1024  # entries of token_ids_logprob
# (top_logprobs_num + len(token_ids_logprob)) x (positions logged: prompt + max new tokens), summed
# over the call's requests: bounds the memory of the logprob lists a request can make the server hold.
MAX_LOGPROB_ENTRIES = 1 << 22


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
    priority: int | list[int] | None = None  # with --enable-priority-scheduling (scheduler/priority.py)
    logit_processor: Any = None  # offline Engine only: a Python callable(logits_row, req)
    # interventions (frontend/interventions.py; need --enable-interventions)
    capture: dict[str, Any] | list[dict[str, Any] | None] | None = None
    steer: list[Any] | None = None
    ablate: list[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _parsed: tuple[list[Any], bool] | None = field(default=None, init=False, repr=False, compare=False)

    # ---------------------------------------------------------------- shape
    def prompts(self) -> tuple[list[Any], bool]:
        """(one prompt per batch item, whether the request was a single one), within the limits;
        parsed once."""
        if self._parsed is None:
            prompts, single = self._prompts()
            if len(prompts) > MAX_BATCH_SIZE:
                raise RequestError(
                    f"A request may hold at most {MAX_BATCH_SIZE} prompts, got {len(prompts)}."
                )
            if self.text is not None:
                check_texts(prompts, "text" if single else None)
            self._parsed = prompts, single
        return self._parsed

    @property
    def single_response(self) -> bool:
        """One response object (not a list): a single prompt, n == 1, sampling_params not a list."""
        _, single = self.prompts()
        sp = self.sampling_params
        n = sp.get("n", 1) if isinstance(sp, dict) else 1
        return single and n == 1 and not isinstance(sp, list)

    def _prompts(self) -> tuple[list[Any], bool]:
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


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # in a str, any surrogate is a lone one


def check_texts(texts: list[str], name: str | None) -> None:
    """Prompt text: bounded in size (it is tokenized on the server's event loop) and valid Unicode
    (a lone surrogate, a valid JSON escape, can be neither encoded nor tokenized). `name` names a
    single prompt's field; None names batch items `text[i]`."""
    chars = sum(len(t) for t in texts)
    if chars > MAX_TEXT_CHARS:
        raise RequestError(f"text holds {chars} characters; a request may hold at most {MAX_TEXT_CHARS}.")
    for i, t in enumerate(texts):
        bad = _LONE_SURROGATE.search(t)
        if bad is not None:
            raise RequestError(
                f"{name or f'text[{i}]'} is not valid Unicode: a lone surrogate U+{ord(bad.group()):04X} "
                f"at character {bad.start()}."
            )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
