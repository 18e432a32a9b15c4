"""ForwardBatch: everything one model forward needs, passed explicitly into `model.forward`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch


class ForwardMode(Enum):
    EXTEND = "extend"  # prefill of new tokens on top of a (possibly empty) cached prefix
    DECODE = "decode"  # exactly one new token per request


@dataclass
class ForwardBatch:
    """One step's tokens, flattened request-major, plus attention metadata.

    `out_cache_loc[i]` is the KV slot token i writes. `attn_metadata` is whatever the batch's
    attention backend built to find each request's cached keys (executor/attention/).
    """

    mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    out_cache_loc: torch.Tensor  # [T]
    attn_metadata: Any = None
    kv_pool: Any = None
    attn_backend: Any = None
    # per-row capture / steer / ablate tensors (models/layers/intervention.py) when some request
    # asks for them, else None: such batches run eager, never the compiled decode step
    interventions: Any = None
    expert_recorder: Any = None  # ExpertDistributionRecorder while recording, else None
    # a mixed chunk (--enable-mixed-chunk): one-token decodes after the EXTEND tokens, with their
    # own DECODE metadata; the attention backend runs them through its decode path
    mixed_decode: ForwardBatch | None = None

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE
