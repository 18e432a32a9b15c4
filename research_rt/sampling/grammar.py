"""Grammar-constrained decoding with xgrammar: compile at the front, one matcher per request.

A request with `regex`, `json_schema` or `ebnf` is compiled when it arrives (in the front, before it
is scheduled), so an invalid grammar answers 400 with xgrammar's reason. `GrammarCompiler` caches
compiled grammars by their text, so repeated schemas (and every sample of an `n > 1` request) compile
once. Each `Req` then owns a `GrammarState` (an xgrammar `GrammarMatcher`):

- before sampling, the sampler asks it for the token bitmask of what may come next
  (`executor/grammar_mask.py` applies the masks of a batch to the logits);
- after sampling, the scheduler calls `advance(req)`: the matcher accepts the new token; when the
  grammar has terminated (it accepted a stop token, or it is complete and allows nothing else) the
  request finishes with reason "stop".

The matcher lives on the `Req`, so a retracted request keeps its state: on resume the scheduler
re-prefills input + output and samples the *next* token; `num_accepted` records which output tokens
the matcher has seen, so it is never re-fed a token it already accepted.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import torch

from research_rt.core.errors import RequestError
from research_rt.core.req import FinishReason, Req, abort_reason
from research_rt.core.sampling_params import SamplingParams

GRAMMAR_KEYS = ("regex", "json_schema", "ebnf")
# JSON may have whitespace between elements (as upstream), but at most this many characters in a
# row: enough for pretty-printed JSON, and it stops a weak model from looping on whitespace forever.
JSON_MAX_WHITESPACE = 32
# xgrammar prefixes its C++ errors with "[hh:mm:ss] /path/file.cc:123: " and "Check failed: ... is false: "
_LOG_PREFIX = re.compile(r"^\s*(\[[0-9:]+\]\s*)?\S+\.(cc|h):\d+:\s*(Check failed: .*? is false: )?")


class GrammarBackend:
    """Compiles grammars for one tokenizer / model vocabulary (lazily: xgrammar loads on first use)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (the width of its logits), not len(tokenizer)
        self.stop_ids = sorted(stop_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids or None
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
            return self._compiler

    def compile(self, sp: SamplingParams) -> Any | None:
        """The compiled grammar of `sp` (None when unconstrained); RequestError when it is invalid."""
        key = next((k for k in GRAMMAR_KEYS if getattr(sp, k) is not None), None)
        if key is None:
            return None
        if self.tokenizer is None:
            raise RequestError(
                "Grammar-constrained decoding (regex, json_schema, ebnf) needs a tokenizer: "
                "the engine runs with skip_tokenizer_init=True."
            )
        text: str = getattr(sp, key)
        if key == "json_schema":
            try:
                json.loads(text)
            except ValueError as e:
                raise RequestError(f"Invalid grammar request: json_schema is not valid JSON: {e}.") from e
        compiler = self._get_compiler()
        try:
            if key == "regex":
                return compiler.compile_regex(text)
            if key == "ebnf":
                return compiler.compile_grammar(text)
            return compiler.compile_json_schema(text, max_whitespace_cnt=JSON_MAX_WHITESPACE)
        except (RuntimeError, ValueError) as e:  # xgrammar raises RuntimeError with the parser's reason
            reason = _LOG_PREFIX.sub("", str(e)).strip()
            raise RequestError(f"Invalid grammar request: {key} could not be compiled: {reason}") from e

    def clear_cache(self) -> None:
        with self._lock:
            if self._compiler is not None:
                self._compiler.clear_cache()


class GrammarState:
    """One request's position in its grammar (an xgrammar GrammarMatcher)."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.num_accepted = 0  # output tokens the matcher has consumed

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (xgrammar's packed int32 layout)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, req: Req) -> None:
        """Feed the output tokens the matcher has not seen (normally just the newest one); finish
        the request when the grammar has terminated, abort it if a token breaks the grammar."""
        while self.num_accepted < len(req.output_ids):
            token = req.output_ids[self.num_accepted]
            self.num_accepted += 1
            if self.matcher.is_terminated():
                break
            if not self.matcher.accept_token(token):
                if req.finished_reason is None:
                    req.finished_reason = abort_reason(
                        f"Token {token} does not match the request's grammar (a logit processor or "
                        "min_new_tokens forced it).",
                        500,
                        "InternalServerError",
                    )
                return
        if req.finished_reason is None and self.matcher.is_terminated():
            req.finished_reason = FinishReason("stop", matched=req.output_ids[-1])
