"""EncoderRunner: an encoder embedding model (BertModel) run over whole padded batches.

Encoders attend bidirectionally and produce one vector per input, so there is no KV cache, no
radix cache and no chunking: `encode` pads a batch of token lists, runs the model once and pools
with the checkpoint's sentence-transformers pooling.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from research_rt.loader.model_loader import context_length, load_model
from research_rt.loader.resolve import ModelSource
from research_rt.models.layers.pooler import SentencePooling
from research_rt.server_args import ServerArgs

logger = logging.getLogger(__name__)


class EncoderRunner:
    def __init__(self, args: ServerArgs, source: ModelSource, config: Any) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.context_len = context_length(config, args.context_length)
        loaded = load_model(source, args.dtype, args.device, args.load_format, config=config)
        self.model, self.config, self.dtype = loaded.model, loaded.config, loaded.dtype
        self.pooling = SentencePooling.from_directory(source.directory)
        self.max_running_requests = args.max_running_requests or 64
        budget = (
            args.chunked_prefill_size if args.chunked_prefill_size and args.chunked_prefill_size > 0 else 8192
        )
        self.max_batch_tokens = max(min(budget, args.max_prefill_tokens), self.context_len)
        self.max_total_num_tokens = self.max_batch_tokens
        self.expert_recorder = None
        logger.info(
            "Encoder %s: pooling %s, normalize %s", source.path, self.pooling.mode, self.pooling.normalize
        )

    @torch.inference_mode()
    def encode(self, inputs: list[list[int]]) -> list[list[float]]:
        """One forward over the right-padded batch; one pooled vector per input."""
        width = max(len(ids) for ids in inputs)
        ids = torch.zeros(len(inputs), width, dtype=torch.int64)
        mask = torch.zeros(len(inputs), width, dtype=torch.int64)
        for i, row in enumerate(inputs):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(ids, mask)
        return self.pooling(hidden, mask).cpu().tolist()

    def update_weights(self, source: ModelSource, load_format: str) -> None:
        from research_rt.loader.model_loader import load_weights_into

        with torch.inference_mode():
            load_weights_into(self.model, source, load_format, progress=False)

    def update_weights_from_tensors(
        self, named: list[tuple[str, torch.Tensor]], direct: bool = False
    ) -> None:
        from research_rt.loader.model_loader import copy_named_tensors

        with torch.inference_mode():
            copy_named_tensors(self.model, named, direct)
