"""OpenAI request bodies -> `/generate` inputs (SGLang's adapter mapping, native_api.md §4): field
checks, sampling parameters, response_format, and the chat template."""

from __future__ import annotations

from json import dumps
from typing import Any

from research_rt.core.errors import RequestError
from research_rt.core.sampling_params import MAX_N
from research_rt.frontend.generate_input import MAX_TEXT_CHARS, GenerateInput
from research_rt.server.protocol import (
    check_fields,
    ids_or_batch,
    int_list,
    is_int,
    is_num,
)

SAMPLING_KEYS = {  # OpenAI / SGLang-extra request key -> sampling_params key
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "n": "n",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_new_tokens",
    "regex": "regex",
    "json_schema": "json_schema",
    "ebnf": "ebnf",
    "ignore_eos": "ignore_eos",
    "no_stop_trim": "no_stop_trim",
    "skip_special_tokens": "skip_special_tokens",
    "seed": "seed",
}


def is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def is_str(v: Any) -> bool:
    return isinstance(v, str)


# Types of the fields both endpoints read (null = absent); values are checked where they are used
# (ranges: SamplingParams.verify, whose texts name the sampling parameter). A string where a boolean
# belongs is a 400, never its truthiness. Fields the spec says are accepted and ignored (user, suffix,
# best_of, logit_bias, tool_choice, ...) are not checked.
COMMON_FIELDS: dict[str, tuple[Any, str]] = {
    "model": (is_str, "a string"),
    "max_tokens": (is_int, "an integer"),
    "max_completion_tokens": (is_int, "an integer"),
    "temperature": (is_num, "a number"),
    "top_p": (is_num, "a number"),
    "top_k": (is_int, "an integer"),
    "min_p": (is_num, "a number"),
    "presence_penalty": (is_num, "a number"),
    "frequency_penalty": (is_num, "a number"),
    "repetition_penalty": (is_num, "a number"),
    "min_tokens": (is_int, "an integer"),
    "seed": (is_int, "an integer"),
    "stop": (
        lambda v: is_str(v) or (isinstance(v, list) and all(map(is_str, v))),
        "a string or a list of strings",
    ),
    "stop_token_ids": (int_list, "a list of token ids"),
    "regex": (is_str, "a string"),
    "json_schema": (is_str, "a string"),
    "ebnf": (is_str, "a string"),
    "ignore_eos": (is_bool, "a boolean"),
    "no_stop_trim": (is_bool, "a boolean"),
    "skip_special_tokens": (is_bool, "a boolean"),
    "stream": (is_bool, "a boolean"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
    "priority": (is_int, "an integer"),  # SGLang 0.5; used with --enable-priority-scheduling
}
COMPLETION_FIELDS = {**COMMON_FIELDS, "echo": (is_bool, "a boolean")}
CHAT_FIELDS = {
    **COMMON_FIELDS,
    "logprobs": (is_bool, "a boolean"),
    "tools": (lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v), "a list of objects"),
}


def check_body(body: dict[str, Any], spec: dict[str, tuple[Any, str]]) -> None:
    check_fields(body, spec)
    opts = body.get("stream_options") or {}
    usage = opts.get("include_usage")
    check(usage is None or isinstance(usage, bool), "Field 'stream_options.include_usage' must be a boolean.")


def include_usage(body: dict[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def sampling_params_of(body: dict[str, Any], max_tokens: int | None, temperature: float) -> dict[str, Any]:
    sp = {dst: body[src] for src, dst in SAMPLING_KEYS.items() if body.get(src) is not None}
    n = sp.get("n", 1)
    check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, "Field 'n' must be a positive integer.")
    check(n <= MAX_N, f"Field 'n' must be at most {MAX_N}, got {n!r:.40}.")
    sp.setdefault("temperature", temperature)
    limit = body.get("max_completion_tokens", body.get("max_tokens", max_tokens))
    sp["max_new_tokens"] = limit
    schema = response_format_schema(body.get("response_format"))
    if schema is not None:
        sp["json_schema"] = schema  # with regex / ebnf also set, verify() answers "Only one of ..."
    return sp


def response_format_schema(fmt: Any) -> str | None:
    """OpenAI `response_format` -> the json_schema sampling parameter (None for plain text)."""
    if fmt is None:
        return None
    check(isinstance(fmt, dict), "Field 'response_format' must be an object.")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return '{"type": "object"}'
    check(
        kind == "json_schema",
        f"response_format.type must be one of text, json_object, json_schema; got {kind!r:.60}.",
    )
    spec = fmt.get("json_schema")
    check(
        isinstance(spec, dict) and isinstance(spec.get("schema"), dict),
        "response_format.json_schema.schema must be an object (the JSON schema).",
    )
    return dumps(spec["schema"])


def check(cond: bool, message: str) -> None:
    if not cond:
        raise RequestError(message)


def chat_prompt(tokenizer: Any, body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    check(isinstance(messages, list) and bool(messages), "Field 'messages' must be a non-empty list.")
    tok = tokenizer
    if tok is None:
        raise RequestError("Chat completions need a tokenizer: the server runs with --skip-tokenizer-init.")
    msgs = []
    for i, m in enumerate(messages):
        check(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool", "developer"),
            f"messages[{i}] must be an object with a role in system, user, assistant, tool.",
        )
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                check(
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str),
                    f"messages[{i}].content: only text parts are supported.",
                )
                parts.append(part["text"])
            content = "".join(parts)
        check(
            content is None or isinstance(content, str), f"messages[{i}].content must be a string or a list."
        )
        msgs.append({**m, "content": content or ""})
    chars = sum(len(m["content"]) for m in msgs)
    check(
        chars <= MAX_TEXT_CHARS,
        f"messages hold {chars} characters of content; a request may hold at most {MAX_TEXT_CHARS}.",
    )
    prefill = msgs.pop()["content"] if msgs[-1]["role"] == "assistant" else None
    try:
        prompt = tok.apply_chat_template(
            msgs, tools=body.get("tools"), tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # noqa: BLE001 - a template error is the client's input
        raise RequestError(f"The chat template could not render these messages: {e}") from e
    ids = tok.encode(prompt, add_special_tokens=False)
    if prefill:
        ids += tok.encode(prefill, add_special_tokens=False)
    return ids


def completion_input(body: dict[str, Any], vocab: int) -> tuple[GenerateInput, int | None, bool]:
    """A `/v1/completions` body -> (the generate input, its `logprobs`, its `echo`)."""
    prompt = body.get("prompt")
    check(prompt is not None, "Field 'prompt' is required.")
    check_body(body, COMPLETION_FIELDS)
    check(
        isinstance(prompt, str)
        or (isinstance(prompt, list) and (all(isinstance(p, str) for p in prompt) or ids_or_batch(prompt))),
        "Field 'prompt' must be a string, a list of strings, a list of token ids or a list of such lists.",
    )
    logprobs, echo = body.get("logprobs"), bool(body.get("echo", False))
    check(
        logprobs is None or (isinstance(logprobs, int) and not isinstance(logprobs, bool) and logprobs >= 0),
        "Field 'logprobs' must be a non-negative integer or null.",
    )
    check(
        logprobs is None or logprobs <= vocab,
        f"Field 'logprobs' must be at most the vocabulary size ({vocab}), got {logprobs!r:.40}.",
    )
    is_ids = isinstance(prompt, list) and bool(prompt) and (int_list(prompt) or isinstance(prompt[0], list))
    obj = GenerateInput(
        text=None if is_ids else prompt,
        input_ids=prompt if is_ids else None,
        sampling_params=sampling_params_of(body, 16, 1.0),
        return_logprob=logprobs is not None,
        top_logprobs_num=logprobs or 0,
        logprob_start_len=0 if echo and logprobs is not None else -1,
        return_text_in_logprobs=True,
        stream=bool(body.get("stream", False)),
        priority=body.get("priority"),
    )
    return obj, logprobs, echo


def chat_input(tokenizer: Any, body: dict[str, Any], vocab: int) -> tuple[GenerateInput, bool]:
    """A `/v1/chat/completions` body -> (the generate input, whether logprobs are wanted)."""
    check_body(body, CHAT_FIELDS)
    ids = chat_prompt(tokenizer, body)
    want_lp = bool(body.get("logprobs", False))
    top = body.get("top_logprobs") or 0
    check(
        isinstance(top, int) and not isinstance(top, bool) and top >= 0,
        "Field 'top_logprobs' must be an integer.",
    )
    check(
        top <= vocab, f"Field 'top_logprobs' must be at most the vocabulary size ({vocab}), got {top!r:.40}."
    )
    sp = sampling_params_of(body, None, 0.7)
    obj = GenerateInput(
        input_ids=ids,
        sampling_params=sp,
        return_logprob=want_lp,
        top_logprobs_num=top,
        return_text_in_logprobs=True,
        stream=bool(body.get("stream", False)),
        priority=body.get("priority"),
    )
    return obj, want_lp
