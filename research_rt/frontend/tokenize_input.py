"""`/tokenize` and `/detokenize` (SGLang 0.5's, also under /v1/): text or a chat -> token ids, and
back; every bad input is a RequestError naming the field.

tokenize: `prompt` (a string, or a list of strings: one id list each) or `messages` (a chat,
rendered with the tokenizer's chat template; `add_generation_prompt`, default true).
`add_special_tokens` defaults to true for a prompt (BOS etc. as the tokenizer adds them) and to
false for a chat (the template writes its own special tokens).
detokenize: `tokens` (a list of ids, or a list of such lists), `skip_special_tokens` (default true).
"""

from __future__ import annotations

from typing import Any

from research_rt.core.errors import RequestError

NO_TOKENIZER = (
    "This engine runs without a tokenizer (skip_tokenizer_init=True): tokenize and detokenize need one."
)
ROLES = ("system", "user", "assistant", "tool", "developer")


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _flag(name: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"Field '{name}' must be a boolean, got {type(value).__name__}.")
    return value


def tokenize(
    tokenizer: Any,
    prompt: str | list[str] | None = None,
    messages: list[dict[str, Any]] | None = None,
    add_special_tokens: bool | None = None,
    add_generation_prompt: bool | None = None,
) -> list[int] | list[list[int]]:
    """The ids of `prompt` (a list of id lists for a list of prompts) or of the rendered chat."""
    if tokenizer is None:
        raise RequestError(NO_TOKENIZER)
    if (prompt is None) == (messages is None):
        raise RequestError(
            "Provide exactly one of 'prompt' (a string or a list of strings) and 'messages' (a chat)."
        )
    if messages is not None:
        special = _flag("add_special_tokens", add_special_tokens, False)
        text = render_chat(tokenizer, messages, _flag("add_generation_prompt", add_generation_prompt, True))
        return tokenizer.encode(text, add_special_tokens=special)
    special = _flag("add_special_tokens", add_special_tokens, True)
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=special)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(p, add_special_tokens=special) for p in prompt]
    raise RequestError("Field 'prompt' must be a string or a non-empty list of strings.")


def render_chat(tokenizer: Any, messages: Any, add_generation_prompt: bool) -> str:
    """The chat as text, through the tokenizer's chat template (text content only)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("Field 'messages' must be a non-empty list of {role, content} objects.")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"Field 'messages[{i}]' must be an object with a role in {', '.join(ROLES)}.")
        content = m.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise RequestError(f"Field 'messages[{i}].content': only text parts are supported.")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise RequestError(f"Field 'messages[{i}].content' must be a string or a list of text parts.")
        chat.append({**m, "content": content or ""})
    try:
        return tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # noqa: BLE001 - a template that cannot render the input is the client's
        raise RequestError(f"Field 'messages': the chat template could not render them: {e}") from e


def detokenize(
    tokenizer: Any, vocab_size: int, tokens: Any, skip_special_tokens: bool | None = None
) -> str | list[str]:
    """The text of `tokens` (a list of texts for a list of id lists); `[]` decodes to ""."""
    if tokenizer is None:
        raise RequestError(NO_TOKENIZER)
    skip = _flag("skip_special_tokens", skip_special_tokens, True)
    if isinstance(tokens, list) and all(_is_id(t) for t in tokens):
        return tokenizer.decode(_checked(tokens, vocab_size, "tokens"), skip_special_tokens=skip)
    if isinstance(tokens, list) and all(isinstance(x, list) and all(_is_id(t) for t in x) for x in tokens):
        return [
            tokenizer.decode(_checked(x, vocab_size, f"tokens[{i}]"), skip_special_tokens=skip)
            for i, x in enumerate(tokens)
        ]
    raise RequestError("Field 'tokens' must be a list of token ids or a list of such lists.")


def _checked(ids: list[int], vocab_size: int, field: str) -> list[int]:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"Field '{field}' has token id {bad}, outside the vocabulary (size {vocab_size}).")
    return ids
