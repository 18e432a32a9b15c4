"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings.

Requests are mapped onto `/generate` inputs (SGLang's adapter mapping, see native_api.md §4);
errors are `{"object": "error", "message", "type": "BadRequestError", "param", "code"}`.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from json import dumps
from typing import Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from research_rt.core.errors import RequestError
from research_rt.core.sampling_params import MAX_N
from research_rt.frontend.embedding_input import EmbeddingInput
from research_rt.frontend.generate_input import MAX_TEXT_CHARS, GenerateInput
from research_rt.server.native import check_embedding_model
from research_rt.server.protocol import (
    SSE_DONE,
    check_fields,
    ids_or_batch,
    int_list,
    is_int,
    is_num,
    openai_error_body,
    parse_json,
    sse,
)
from research_rt.server.state import ServerState

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


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


# Types of the fields both endpoints read (null = absent); values are checked where they are used
# (ranges: SamplingParams.verify, whose texts name the sampling parameter). A string where a boolean
# belongs is a 400, never its truthiness. Fields the spec says are accepted and ignored (user, suffix,
# best_of, logit_bias, tool_choice, ...) are not checked.
COMMON_FIELDS: dict[str, tuple[Any, str]] = {
    "model": (_is_str, "a string"),
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
        lambda v: _is_str(v) or (isinstance(v, list) and all(map(_is_str, v))),
        "a string or a list of strings",
    ),
    "stop_token_ids": (int_list, "a list of token ids"),
    "regex": (_is_str, "a string"),
    "json_schema": (_is_str, "a string"),
    "ebnf": (_is_str, "a string"),
    "ignore_eos": (_is_bool, "a boolean"),
    "no_stop_trim": (_is_bool, "a boolean"),
    "skip_special_tokens": (_is_bool, "a boolean"),
    "stream": (_is_bool, "a boolean"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
}
COMPLETION_FIELDS = {**COMMON_FIELDS, "echo": (_is_bool, "a boolean")}
CHAT_FIELDS = {
    **COMMON_FIELDS,
    "logprobs": (_is_bool, "a boolean"),
    "tools": (lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v), "a list of objects"),
}


def _check_body(body: dict[str, Any], spec: dict[str, tuple[Any, str]]) -> None:
    check_fields(body, spec)
    opts = body.get("stream_options") or {}
    usage = opts.get("include_usage")
    _check(
        usage is None or isinstance(usage, bool), "Field 'stream_options.include_usage' must be a boolean."
    )


def _include_usage(body: dict[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def _sampling(body: dict[str, Any], max_tokens: int | None, temperature: float) -> dict[str, Any]:
    sp = {dst: body[src] for src, dst in SAMPLING_KEYS.items() if body.get(src) is not None}
    n = sp.get("n", 1)
    _check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, "Field 'n' must be a positive integer.")
    _check(n <= MAX_N, f"Field 'n' must be at most {MAX_N}, got {n!r:.40}.")
    sp.setdefault("temperature", temperature)
    limit = body.get("max_completion_tokens", body.get("max_tokens", max_tokens))
    sp["max_new_tokens"] = limit
    schema = _response_format_schema(body.get("response_format"))
    if schema is not None:
        sp["json_schema"] = schema  # with regex / ebnf also set, verify() answers "Only one of ..."
    return sp


def _response_format_schema(fmt: Any) -> str | None:
    """OpenAI `response_format` -> the json_schema sampling parameter (None for plain text)."""
    if fmt is None:
        return None
    _check(isinstance(fmt, dict), "Field 'response_format' must be an object.")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return '{"type": "object"}'
    _check(
        kind == "json_schema",
        f"response_format.type must be one of text, json_object, json_schema; got {kind!r:.60}.",
    )
    spec = fmt.get("json_schema")
    _check(
        isinstance(spec, dict) and isinstance(spec.get("schema"), dict),
        "response_format.json_schema.schema must be an object (the JSON schema).",
    )
    return dumps(spec["schema"])


def _finish(meta: dict[str, Any]) -> tuple[str | None, Any]:
    reason = meta.get("finish_reason")
    if not reason:
        return None, None
    return reason["type"], reason.get("matched")


def _usage(state: ServerState, finals: list[dict[str, Any]], n: int) -> dict[str, Any]:
    prompt = sum(r["meta_info"]["prompt_tokens"] for i, r in enumerate(finals) if i % n == 0)
    completion = sum(r["meta_info"]["completion_tokens"] for r in finals)
    cached = sum(r["meta_info"]["cached_tokens"] for r in finals)
    details = {"cached_tokens": cached} if state.server_args.enable_cache_report else None
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
    }


def _completion_logprobs(entries: list[Any], tops: list[Any] | None) -> dict[str, Any]:
    return {
        "text_offset": [-1] * len(entries),
        "token_logprobs": [e[0] for e in entries],
        "tokens": [e[2] for e in entries],
        "top_logprobs": [
            None if t is None else {x[2]: x[0] for x in t} for t in (tops or [None] * len(entries))
        ],
    }


def _chat_logprobs(entries: list[Any], tops: list[Any] | None) -> dict[str, Any]:
    def item(e: Any) -> dict[str, Any]:
        tok = e[2] or ""
        return {"token": tok, "bytes": list(tok.encode("utf-8")), "logprob": e[0]}

    tops = tops or [[] for _ in entries]
    return {
        "content": [{**item(e), "top_logprobs": [item(x) for x in t or []]} for e, t in zip(entries, tops)]
    }


async def _stream(
    request: Request,
    state: ServerState,
    obj: GenerateInput,
    n: int,
    make_chunks: Any,
    include_usage: bool,
    base: dict[str, Any],
) -> None:
    """Drive one OpenAI stream: `make_chunks(index, resp, finished)` returns the chunks to send."""
    finals: dict[int, dict[str, Any]] = {}
    async with contextlib.aclosing(state.generate(obj)) as events:
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        response = await request.respond(
            content_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        try:
            pending = [first] if first is not None else []
            async for event in _chain(pending, events):
                index, resp, finished = event.index, event.response, event.finished
                if finished:
                    if event.error is not None:
                        raise RequestError(*event.error)
                    finals[index] = resp
                for chunk in make_chunks(index, resp, finished):
                    await response.send(sse(chunk))
            if include_usage:
                ordered = [finals[i] for i in sorted(finals)]
                await response.send(sse({**base, "choices": [], "usage": _usage(state, ordered, n)}))
        except RequestError as e:
            await response.send(sse({"error": openai_error_body(e.message, e.status_code)}))
        await response.send(SSE_DONE)
        await response.eof()


async def _chain(first: list[Any], rest: Any) -> Any:
    for x in first:
        yield x
    async for x in rest:
        yield x


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise RequestError(message)


async def completions(request: Request) -> HTTPResponse | None:
    state = _state(request)
    body = parse_json(request.body)
    prompt = body.get("prompt")
    _check(prompt is not None, "Field 'prompt' is required.")
    _check_body(body, COMPLETION_FIELDS)
    _check(
        isinstance(prompt, str)
        or (isinstance(prompt, list) and (all(isinstance(p, str) for p in prompt) or ids_or_batch(prompt))),
        "Field 'prompt' must be a string, a list of strings, a list of token ids or a list of such lists.",
    )
    logprobs, echo = body.get("logprobs"), bool(body.get("echo", False))
    _check(
        logprobs is None or (isinstance(logprobs, int) and not isinstance(logprobs, bool) and logprobs >= 0),
        "Field 'logprobs' must be a non-negative integer or null.",
    )
    vocab = state.engine.vocab_size
    _check(
        logprobs is None or logprobs <= vocab,
        f"Field 'logprobs' must be at most the vocabulary size ({vocab}), got {logprobs!r:.40}.",
    )
    is_ids = isinstance(prompt, list) and bool(prompt) and (int_list(prompt) or isinstance(prompt[0], list))
    obj = GenerateInput(
        text=None if is_ids else prompt,
        input_ids=prompt if is_ids else None,
        sampling_params=_sampling(body, 16, 1.0),
        return_logprob=logprobs is not None,
        top_logprobs_num=logprobs or 0,
        logprob_start_len=0 if echo and logprobs is not None else -1,
        return_text_in_logprobs=True,
        stream=bool(body.get("stream", False)),
    )
    prompts, _ = obj.prompts()
    n = int(obj.sampling_params.get("n", 1))  # type: ignore[union-attr]
    tok = state.tokenizer

    def prompt_text(i: int) -> str:
        p = prompts[i // n]
        return p if isinstance(p, str) else (tok.decode(p) if tok is not None else "")

    base = {
        "id": "cmpl-" + uuid.uuid4().hex,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model") or state.served_model_name,
    }

    def logprob_block(
        meta: dict[str, Any], out_from: int = 0, with_input: bool = False
    ) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        entries = meta["output_token_logprobs"][out_from:]
        tops = meta.get("output_top_logprobs", [])[out_from:] if logprobs else None
        if with_input:
            entries = meta["input_token_logprobs"] + entries
            tops = (meta.get("input_top_logprobs", []) + tops) if tops is not None else None
        return _completion_logprobs(entries, tops)

    if obj.stream:
        sent_text: dict[int, int] = {}
        sent_lp: dict[int, int] = {}

        def chunks(index: int, resp: dict[str, Any], finished: bool) -> list[dict[str, Any]]:
            meta, text = resp["meta_info"], resp.get("text", "")
            first = index not in sent_text
            delta = text[sent_text.get(index, 0) :]
            lp = logprob_block(meta, sent_lp.get(index, 0), first and echo)
            sent_text[index] = len(text)
            sent_lp[index] = meta["completion_tokens"]
            if first and echo:
                delta = prompt_text(index) + delta
            reason, matched = _finish(meta)
            if not delta and not finished and not lp:
                return []
            choice = {
                "index": index,
                "text": delta,
                "logprobs": lp,
                "finish_reason": reason,
                "matched_stop": matched,
            }
            return [{**base, "choices": [choice]}]

        await _stream(request, state, obj, n, chunks, _include_usage(body), base)
        return None

    finals = await state.collect(obj)
    choices = []
    for i, resp in enumerate(finals):
        meta = resp["meta_info"]
        reason, matched = _finish(meta)
        text = (prompt_text(i) if echo else "") + resp.get("text", "")
        choices.append(
            {
                "index": i,
                "text": text,
                "logprobs": logprob_block(meta, 0, echo),
                "finish_reason": reason,
                "matched_stop": matched,
            }
        )
    return json(
        {
            **base,
            "id": "cmpl-" + finals[0]["meta_info"]["id"],
            "choices": choices,
            "usage": _usage(state, finals, n),
        }
    )


def _chat_prompt(state: ServerState, body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    _check(isinstance(messages, list) and bool(messages), "Field 'messages' must be a non-empty list.")
    tok = state.tokenizer
    if tok is None:
        raise RequestError("Chat completions need a tokenizer: the server runs with --skip-tokenizer-init.")
    msgs = []
    for i, m in enumerate(messages):
        _check(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool", "developer"),
            f"messages[{i}] must be an object with a role in system, user, assistant, tool.",
        )
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                _check(
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str),
                    f"messages[{i}].content: only text parts are supported.",
                )
                parts.append(part["text"])
            content = "".join(parts)
        _check(
            content is None or isinstance(content, str), f"messages[{i}].content must be a string or a list."
        )
        msgs.append({**m, "content": content or ""})
    chars = sum(len(m["content"]) for m in msgs)
    _check(
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


async def chat_completions(request: Request) -> HTTPResponse | None:
    state = _state(request)
    body = parse_json(request.body)
    _check_body(body, CHAT_FIELDS)
    ids = _chat_prompt(state, body)
    want_lp = bool(body.get("logprobs", False))
    top = body.get("top_logprobs") or 0
    _check(
        isinstance(top, int) and not isinstance(top, bool) and top >= 0,
        "Field 'top_logprobs' must be an integer.",
    )
    vocab = state.engine.vocab_size
    _check(
        top <= vocab, f"Field 'top_logprobs' must be at most the vocabulary size ({vocab}), got {top!r:.40}."
    )
    sp = _sampling(body, None, 0.7)
    obj = GenerateInput(
        input_ids=ids,
        sampling_params=sp,
        return_logprob=want_lp,
        top_logprobs_num=top,
        return_text_in_logprobs=True,
        stream=bool(body.get("stream", False)),
    )
    n = int(sp.get("n", 1))
    base = {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model") or state.served_model_name,
    }

    def lp_block(meta: dict[str, Any], start: int = 0) -> dict[str, Any] | None:
        if not want_lp:
            return None
        return _chat_logprobs(
            meta["output_token_logprobs"][start:], meta.get("output_top_logprobs", [])[start:] or None
        )

    if obj.stream:
        sent: dict[int, tuple[int, int]] = {}

        def chunks(index: int, resp: dict[str, Any], finished: bool) -> list[dict[str, Any]]:
            meta, text = resp["meta_info"], resp.get("text", "")
            out = []
            if index not in sent:
                out.append(
                    {
                        **base,
                        "choices": [
                            {
                                "index": index,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            chars, toks = sent.get(index, (0, 0))
            delta, lp = text[chars:], lp_block(meta, toks)
            sent[index] = (len(text), meta["completion_tokens"])
            if delta or (lp and lp["content"]):
                out.append(
                    {
                        **base,
                        "choices": [
                            {
                                "index": index,
                                "delta": {"content": delta},
                                "logprobs": lp,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            if finished:
                reason, matched = _finish(meta)
                out.append(
                    {
                        **base,
                        "choices": [
                            {
                                "index": index,
                                "delta": {},
                                "logprobs": None,
                                "finish_reason": reason,
                                "matched_stop": matched,
                            }
                        ],
                    }
                )
            return out

        await _stream(request, state, obj, n, chunks, _include_usage(body), base)
        return None

    finals = await state.collect(obj)
    choices = []
    for i, resp in enumerate(finals):
        reason, matched = _finish(resp["meta_info"])
        message = {
            "role": "assistant",
            "content": resp.get("text", ""),
            "reasoning_content": None,
            "tool_calls": None,
        }
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": lp_block(resp["meta_info"]),
                "finish_reason": reason,
                "matched_stop": matched,
            }
        )
    return json({**base, "object": "chat.completion", "choices": choices, "usage": _usage(state, finals, n)})


async def models(request: Request) -> HTTPResponse:
    state = _state(request)
    name = state.served_model_name
    card = {
        "id": name,
        "object": "model",
        "created": int(state.started),
        "owned_by": "sglang",
        "root": name,
        "max_model_len": state.engine.context_len,
    }
    return json({"object": "list", "data": [card]})


async def embeddings(request: Request) -> HTTPResponse:
    """`input`: str | list[str] | list[int] | list[list[int]] -> one `data` item per input."""
    state = _state(request)
    body = parse_json(request.body)
    inp = body.get("input")
    _check(inp is not None, "Field 'input' is required.")
    is_ids = isinstance(inp, list) and bool(inp) and not any(isinstance(x, str) for x in inp)
    obj = EmbeddingInput(input_ids=inp) if is_ids else EmbeddingInput(text=inp)
    obj.prompts()
    check_embedding_model(state)
    results, _ = await state.encode(obj)
    tokens = sum(r["meta_info"]["prompt_tokens"] for r in results)
    return json(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": r["embedding"], "index": i}
                for i, r in enumerate(results)
            ],
            "model": state.model_path,
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
    )


def _state(request: Request) -> ServerState:
    return request.app.ctx.state


def register(app: Sanic) -> None:
    app.add_route(models, "/v1/models", methods=["GET"])
    app.add_route(completions, "/v1/completions", methods=["POST"])
    app.add_route(chat_completions, "/v1/chat/completions", methods=["POST"])
    app.add_route(embeddings, "/v1/embeddings", methods=["POST"])
