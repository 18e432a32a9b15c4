"""RequestBuilder: text -> ids, validation with SGLang's error texts, and the `Req`s of an input."""

from __future__ import annotations

import random
import uuid
from typing import Any

import torch

from research_rt.core.errors import RequestError
from research_rt.core.interventions import CaptureStore, InterventionShape
from research_rt.core.req import Req
from research_rt.core.sampling_params import SamplingParams
from research_rt.frontend.generate_input import (
    MAX_LOGPROB_ENTRIES,
    MAX_REQUESTS,
    MAX_TOKEN_IDS_LOGPROB,
    GenerateInput,
)
from research_rt.frontend.interventions import InterventionParser, for_item
from research_rt.sampling.custom_logit_processor import DISABLED_MESSAGE, load_processor
from research_rt.sampling.grammar import GrammarBackend, GrammarState


def eos_token_ids(config: Any, tokenizer: Any, generation_eos: Any = None) -> frozenset[int]:
    ids: set[int] = set()
    for value in (
        getattr(config, "eos_token_id", None),
        generation_eos,
        getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None,
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


class RequestBuilder:
    def __init__(
        self,
        tokenizer: Any,
        args,
        config: Any,
        context_len: int,
        pool_size: int,
        stop_ids: frozenset[int],
        shape: InterventionShape | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.args = args
        self.vocab_size = int(config.vocab_size)
        self.context_len = context_len
        self.max_req_len = min(context_len - 1, pool_size - 1)
        self.max_req_input_len = self.max_req_len - 5
        self.stop_ids = stop_ids
        self.rng = random.Random(args.random_seed)
        self.grammar = GrammarBackend(tokenizer, self.vocab_size, stop_ids)  # compiles on first use
        self.interventions = InterventionParser(args, shape)

    # ---------------------------------------------------------------- requests
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if self.tokenizer is None:
            raise RequestError(
                "The engine initialized with skip_tokenizer_init=True cannot accept text prompts. "
                "Please provide input_ids or re-initialize the engine with skip_tokenizer_init=False."
            )
        return self.tokenizer.encode(prompt)

    def make_reqs(self, obj: GenerateInput) -> list[list[Req]]:
        """Validate and build requests: one list per prompt, holding its n samples.

        Everything a client controls is checked (and bounded: generate_input.py's limits) before the work
        that grows with it: prompts, sampling params and counts, then tokenizing, then building."""
        prompts, single = obj.prompts()  # batch size, text size and Unicode checked there
        bs = len(prompts)
        if obj.rid is not None and not single and not isinstance(obj.rid, list):
            raise RequestError("rid must be a list of strings for a batch request.")
        if isinstance(obj.rid, list):
            rids = [obj.per_item("rid", i, bs) for i in range(bs)]
            dup = next((r for i, r in enumerate(rids) if r in rids[:i]), None)
            if dup is not None:
                raise RequestError(f"rid has a duplicate entry {dup!r:.60}: each prompt needs its own id.")
        sps = [
            self.sampling_params(
                obj.per_item("sampling_params", i, bs)
                if isinstance(obj.sampling_params, list)
                else obj.sampling_params
            )
            for i in range(bs)
        ]
        total = sum(sp.n for sp in sps)
        if total > MAX_REQUESTS:
            raise RequestError(
                f"A request may start at most {MAX_REQUESTS} generations (prompts x n), got {total}."
            )
        checked = []
        for prompt, sp in zip(prompts, sps):
            ids = self.tokenize(prompt)
            self.check_input(ids, sp)
            checked.append((ids, sp))
        groups = []
        for i, (ids, sp) in enumerate(checked):
            compiled = self.grammar.compile(sp)  # 400 with the library's reason if invalid
            processor = self._custom_processor(obj.per_item("custom_logit_processor", i, bs))
            priority = self._priority(obj.per_item("priority", i, bs))
            n = sp.n
            rid = obj.per_item("rid", i, bs) if obj.rid is not None else None
            reqs = []
            for j in range(n):
                sp_j = sp if n == 1 else _copy_sampling(sp, j)
                req = self._make_req(obj, i, bs, ids, sp_j, rid if n == 1 and rid else uuid.uuid4().hex)
                req.grammar = GrammarState(compiled) if compiled is not None else None
                req.custom_logit_processor = processor
                req.priority = priority
                reqs.append(req)
            groups.append(reqs)
        entries = sum(_logprob_entries(r) for reqs in groups for r in reqs)
        if entries > MAX_LOGPROB_ENTRIES:
            raise RequestError(
                f"Too many logprobs asked for: (top_logprobs_num + len(token_ids_logprob)) x positions "
                f"(prompt from logprob_start_len + max_new_tokens), over all samples, is {entries}; "
                f"at most {MAX_LOGPROB_ENTRIES}. Ask for fewer top logprobs or fewer tokens."
            )
        return groups

    def sampling_params(self, d: dict[str, Any] | None) -> SamplingParams:
        if d is not None and not isinstance(d, dict):
            raise RequestError("sampling_params must be an object.")
        try:
            sp = SamplingParams.from_dict(d)
            sp.verify()
        except ValueError as e:
            raise RequestError(str(e)) from e
        bad = next((t for t in sp.stop_token_ids or [] if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(
                f"sampling_params.stop_token_ids has a token id outside the vocabulary "
                f"(size {self.vocab_size}): {bad!r:.40}."
            )
        return sp.normalize()

    def _custom_processor(self, serialized: str | None) -> tuple[str, Any] | None:
        if serialized is None:
            return None
        if not self.args.enable_custom_logit_processor:
            raise RequestError(DISABLED_MESSAGE)
        if not isinstance(serialized, str):
            raise RequestError("custom_logit_processor must be a string (CustomLogitProcessor.to_str()).")
        return serialized, load_processor(serialized)

    def _priority(self, value: Any) -> int | None:
        """A request's priority; ignored (None) unless --enable-priority-scheduling, or refused
        with --abort-on-priority-when-disabled."""
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise RequestError(f"Field 'priority' must be an integer, got {value!r:.40}.")
        if self.args.enable_priority_scheduling:
            return value
        if self.args.abort_on_priority_when_disabled:
            raise RequestError(
                "Field 'priority' was given but priority scheduling is disabled "
                "(start the server with --enable-priority-scheduling)."
            )
        return None

    def check_input(self, ids: list[int], sp: SamplingParams) -> None:
        n = len(ids)
        if n == 0:
            raise RequestError("The input is empty (no tokens).")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(
                f"Token id {bad} in input_ids is outside the vocabulary (size {self.vocab_size})."
            )
        if n >= self.context_len:
            raise RequestError(
                f"The input ({n} tokens) is longer than the model's context length ({self.context_len} tokens)."
            )
        if sp.max_new_tokens is not None and n + sp.max_new_tokens >= self.context_len:
            raise RequestError(
                f"Requested token count exceeds the model's maximum context length of {self.context_len} tokens. "
                f"You requested a total of {n + sp.max_new_tokens} tokens: {n} tokens from the input messages and "
                f"{sp.max_new_tokens} tokens for the completion. Please reduce the number of tokens in the input "
                "messages or the completion to fit within the limit."
            )
        if n > self.max_req_input_len:
            raise RequestError(
                f"Input length ({n} tokens) exceeds the maximum allowed length ({self.max_req_input_len} tokens). "
                "Use a shorter input or enable --allow-auto-truncate."
            )

    def _make_req(
        self, obj: GenerateInput, i: int, bs: int, ids: list[int], sp: SamplingParams, rid: str
    ) -> Req:
        n = len(ids)
        room = self.max_req_len - n - 1
        sp.max_new_tokens = room if sp.max_new_tokens is None else min(sp.max_new_tokens, room)
        start = obj.per_item("logprob_start_len", i, bs)
        start = n - 1 if start is None or start == -1 else int(start)
        return_logprob = bool(obj.per_item("return_logprob", i, bs))
        if return_logprob and start >= n:
            raise RequestError(
                f"logprob_start_len, ({start}) is higher than the number of input tokens ({n}). "
                "Request with a lower logprob_start_len."
            )
        if start < 0:
            raise RequestError(f"logprob_start_len must be -1 or at least 0, got {start}.")
        top = obj.per_item("top_logprobs_num", i, bs) or 0
        if not _is_int(top) or not 0 <= top <= self.vocab_size:
            raise RequestError(
                f"top_logprobs_num must be an integer in [0, {self.vocab_size}] (the vocabulary size), "
                f"got {top!r:.40}."
            )
        given = obj.per_item("token_ids_logprob", i, bs) or None
        if given is not None and len(given) > MAX_TOKEN_IDS_LOGPROB:
            raise RequestError(
                f"token_ids_logprob may hold at most {MAX_TOKEN_IDS_LOGPROB} ids, got {len(given)}."
            )
        if given is not None and any(not _is_int(t) or not 0 <= t < self.vocab_size for t in given):
            raise RequestError("token_ids_logprob has a token id outside the vocabulary.")
        spec = self.interventions.parse(
            for_item(obj.capture, dict, i, bs, "capture"),
            for_item(obj.steer, list, i, bs, "steer"),
            for_item(obj.ablate, list, i, bs, "ablate"),
            bool(obj.return_hidden_states),
            n,
            sp.max_new_tokens,
        )
        seed = sp.sampling_seed if sp.sampling_seed is not None else self.rng.randrange(1 << 62)
        gen = torch.Generator().manual_seed(int(seed))
        return Req(
            rid=rid,
            input_ids=list(ids),
            sampling=sp,
            return_logprob=return_logprob,
            logprob_start_len=start,
            top_logprobs_num=int(top),
            token_ids_logprob=list(given) if given else None,
            return_hidden_states=bool(obj.return_hidden_states),
            stream=bool(obj.stream),
            stop_ids=self.stop_ids,
            logit_processor=obj.logit_processor,
            generator=gen,
            interventions=spec,
            captured=None if spec is None else CaptureStore(last_only=_last_only(spec)),
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _logprob_entries(req: Req) -> int:
    """How many logprob entries `req` can record (prompt positions + new tokens) x (top + given)."""
    if not req.return_logprob:
        return 0
    per_position = req.top_logprobs_num + len(req.token_ids_logprob or ())
    positions = len(req.input_ids) - req.logprob_start_len + (req.sampling.max_new_tokens or 0)
    return per_position * positions


def _last_only(spec) -> bool:
    return spec.capture is not None and spec.capture.positions == "last"


def _copy_sampling(sp: SamplingParams, j: int) -> SamplingParams:
    import dataclasses

    out = dataclasses.replace(sp, stop=list(sp.stop or []), stop_token_ids=list(sp.stop_token_ids or []))
    if sp.sampling_seed is not None:
        out.sampling_seed = sp.sampling_seed + j
    return out
