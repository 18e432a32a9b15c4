"""Request bodies in, JSON and SSE out: parsing and type checks with messages naming the field.

Upstream parses bodies with FastAPI (wrong types -> 422, unknown sampling keys -> 500); research_rt
answers 400 `{"error": {"message": ...}}` for every client mistake, naming the offending field.
Unknown top-level keys are ignored (as upstream), so SGLang clients that send extras still work.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from research_rt.core.errors import RequestError
from research_rt.frontend.generate_input import GenerateInput

MAX_JSON_DEPTH = 100  # nesting of arrays and objects in a request body


class _NonFinite:
    """What NaN, Infinity, -Infinity and overflowing literals (1e999) parse to: found by
    `_check_tree`, which names the field (json.loads' own hook cannot know where it is)."""

    __slots__ = ("literal",)

    def __init__(self, literal: str) -> None:
        self.literal = literal


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \uD800-\uDFFF: maybe a lone surrogate
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # after parsing, a surrogate is always lone
_TOO_DEEP = f"The request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)."


def parse_json(body: bytes | None, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object; `{}` for an empty body when not `required`.

    Strict JSON (RFC 8259): UTF-8; NaN / Infinity (which Python's parser accepts) and numbers that
    overflow a float are rejected, as are strings holding lone surrogates (valid escapes, invalid
    text) and nesting deeper than MAX_JSON_DEPTH; each answers 400 naming the field."""
    if not body or not body.strip():
        if required:
            raise RequestError("The request body is empty: expected a JSON object.")
        return {}
    try:
        text = body.decode("utf-8-sig") if isinstance(body, (bytes, bytearray)) else body
    except UnicodeDecodeError as e:
        raise RequestError(f"The request body is not valid UTF-8: {e}.") from e
    non_finite = False

    def constant(literal: str) -> _NonFinite:
        nonlocal non_finite
        non_finite = True
        return _NonFinite(literal)

    def parse_float(literal: str) -> float | _NonFinite:
        nonlocal non_finite
        value = _parse_float(literal)
        non_finite = non_finite or isinstance(value, _NonFinite)
        return value

    try:
        data = json.loads(text, parse_constant=constant, parse_float=parse_float)
    except RecursionError as e:
        raise RequestError(_TOO_DEEP) from e
    except ValueError as e:
        raise RequestError(f"Malformed JSON body: {e}.") from e
    if not isinstance(data, dict):
        raise RequestError(f"The request body must be a JSON object, got {_type(data)}.")
    # the walk is needed only where these cheap scans say something could be wrong
    if non_finite or _SURROGATE_ESCAPE.search(text) or text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        _check_tree(data)
    return data


def _check_tree(data: Any) -> None:
    """Walk the parsed body (iteratively): nesting depth, non-finite numbers, lone surrogates."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)) and depth >= MAX_JSON_DEPTH:
            raise RequestError(_TOO_DEEP)
        if isinstance(value, dict):
            for key, item in value.items():
                if _LONE_SURROGATE.search(key):
                    _surrogate_error(f"A key in '{path}'" if path else "A key", key)
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                _surrogate_error(f"Field '{path}'", value)
        elif isinstance(value, _NonFinite):
            raise RequestError(f"Field '{path}' must be a finite number, got {value.literal}.")


def _surrogate_error(what: str, text: str) -> None:
    bad = _LONE_SURROGATE.search(text)
    assert bad is not None
    raise RequestError(
        f"{what} is not valid Unicode: it holds a lone surrogate \\u{ord(bad.group()):04x} at "
        f"character {bad.start()} (UTF-16 surrogates must come in pairs)."
    )


def _type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def one_or_list(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: check(v) or (isinstance(v, list) and all(check(x) for x in v))


def int_list(v: Any) -> bool:
    return isinstance(v, list) and all(is_int(x) for x in v)


def ids_or_batch(v: Any) -> bool:
    return int_list(v) or (isinstance(v, list) and all(int_list(x) for x in v))


# field -> (check, expected-type text)
GENERATE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "text": (one_or_list(lambda v: isinstance(v, str)), "a string or a list of strings"),
    "input_ids": (ids_or_batch, "a list of token ids or a list of such lists"),
    "sampling_params": (one_or_list(lambda v: isinstance(v, dict)), "an object or a list of objects"),
    "rid": (one_or_list(lambda v: isinstance(v, str)), "a string or a list of strings"),
    "return_logprob": (one_or_list(lambda v: isinstance(v, bool)), "a boolean or a list of booleans"),
    "logprob_start_len": (one_or_list(is_int), "an integer or a list of integers"),
    "top_logprobs_num": (
        one_or_list(lambda v: is_int(v) and v >= 0),
        "a non-negative integer or a list of them",
    ),
    "token_ids_logprob": (ids_or_batch, "a list of token ids or a list of such lists"),
    "return_text_in_logprobs": (lambda v: isinstance(v, bool), "a boolean"),
    "stream": (lambda v: isinstance(v, bool), "a boolean"),
    "return_hidden_states": (lambda v: isinstance(v, bool), "a boolean"),
    "log_metrics": (lambda v: isinstance(v, bool), "a boolean"),
    "custom_logit_processor": (one_or_list(lambda v: isinstance(v, str)), "a string"),
    "priority": (one_or_list(is_int), "an integer or a list of integers"),
    # interventions (research_rt; --enable-interventions): values checked by frontend/interventions.py
    "capture": (one_or_list(lambda v: v is None or isinstance(v, dict)), "an object or a list of objects"),
    "steer": (lambda v: isinstance(v, list), "a list"),
    "ablate": (lambda v: isinstance(v, list), "a list"),
}
UNSUPPORTED_FIELDS = ("image_data", "audio_data", "lora_path", "session_params", "input_embeds")


def check_fields(data: dict[str, Any], spec: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    for name, (check, expected) in spec.items():
        value = data.get(name)
        if value is not None and not check(value):
            raise RequestError(f"Field '{name}' must be {expected}, got {_type(value)}.")


def generate_input(data: dict[str, Any]) -> GenerateInput:
    """A `/generate` body -> GenerateInput (types checked here; values checked by the engine)."""
    check_fields(data, GENERATE_FIELDS)
    for name in UNSUPPORTED_FIELDS:
        if data.get(name) is not None:
            raise RequestError(f"Field '{name}' is not supported by research_rt.")
    kwargs = {k: data[k] for k in GENERATE_FIELDS if data.get(k) is not None}
    for key in ("return_text_in_logprobs", "stream", "return_hidden_states", "log_metrics"):
        kwargs.setdefault(key, GenerateInput.__dataclass_fields__[key].default)
    obj = GenerateInput(**kwargs)
    obj.prompts()  # both/neither text and input_ids, empty lists -> RequestError now
    return obj


def error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message}}


def openai_error_body(message: str, status: int = 400) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": status}
