"""Embedding requests (`/encode`, `/classify`, `/v1/embeddings`, `Engine.encode`): input, Reqs, responses.

An embedding request is a prefill-only Req (`max_new_tokens` 0) with `return_embedding` set: the
decoder scheduler pools its last token's final hidden state at the end of prefill (so batching,
chunked prefill and the radix cache apply unchanged); the encoder scheduler runs it whole.
Unlike SGLang v0.4.5, a one-element list is a batch of one (a list comes back).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from research_rt.core.errors import RequestError
from research_rt.core.req import Req
from research_rt.frontend.generate_input import GenerateInput

NOT_EMBEDDING = (
    "This model does not appear to be an embedding model by default. Please add `--is-embedding` when "
    "launching the server or try another model."
)
NOT_GENERATION = (
    "This model is served as an embedding model (--is-embedding, or detected from its architecture): "
    "it does not generate text. Use /encode, /classify or /v1/embeddings."
)


@dataclass
class EmbeddingInput:
    """SGLang's EmbeddingReqInput: `text` or `input_ids`, single or batch."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    rid: str | list[str] | None = None
    image_data: Any = None
    log_metrics: bool = True

    def prompts(self) -> tuple[list[Any], bool]:
        if self.text is None and self.input_ids is None and self.image_data is None:
            raise RequestError("At least one of text, input_ids, or image should be provided")
        if self.text is not None and self.input_ids is not None:
            raise RequestError("text and input_ids cannot be provided at the same time")
        if self.image_data is not None:
            raise RequestError("image_data is not supported by research_rt.")
        return GenerateInput(text=self.text, input_ids=self.input_ids).prompts()


def make_embedding_reqs(
    builder, obj: EmbeddingInput, pad_token_id: int | None = None
) -> tuple[list[Req], bool]:
    """Validate `obj` and build one Req per input. With `pad_token_id` (score heads), trailing pad
    tokens are dropped: transformers scores the rightmost non-pad token."""
    prompts, single = obj.prompts()
    if (
        obj.rid is not None
        and not single
        and not (isinstance(obj.rid, list) and len(obj.rid) == len(prompts))
    ):
        raise RequestError("rid must be a list of strings, one per input, for a batch request.")
    reqs = []
    for i, prompt in enumerate(prompts):
        ids = list(builder.tokenize(prompt))
        if pad_token_id is not None:
            keep = max((j + 1 for j, t in enumerate(ids) if t != pad_token_id), default=min(1, len(ids)))
            ids = ids[:keep]
        sp = builder.sampling_params({"max_new_tokens": 0})
        builder.check_input(ids, sp)
        rid = (obj.rid if single else obj.rid[i]) if obj.rid is not None else uuid.uuid4().hex
        reqs.append(Req(rid=str(rid), input_ids=ids, sampling=sp, return_embedding=True))
    return reqs, single
