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

    `out_cache_loc[i]` is the KV slot token i writes; `kv_indices[b, j]` the slot of request b's
    j-th key (0, the dummy slot, past its length); `attn_mask[b, 0, i, j]` whether query i of
    request b sees key j. For EXTEND, `q_gather[b, i]` indexes the flat extend tokens (padding
    indexes one past the end) and `q_scatter[t]` indexes the padded [B * Lq] layout back.
    """

    mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    out_cache_loc: torch.Tensor  # [T]
    kv_indices: torch.Tensor  # [B, Lk]
    attn_mask: torch.Tensor  # [B, 1, Lq, Lk] bool
    q_gather: torch.Tensor | None = None  # [B, Lq] (EXTEND only)
    q_scatter: torch.Tensor | None = None  # [T] (EXTEND only)
    kv_pool: Any = None
    attn_backend: Any = None
    capture_hidden: bool = False
    expert_recorder: Any = None  # ExpertDistributionRecorder while recording, else None
    # a mixed chunk (--enable-mixed-chunk): one-token decodes after the EXTEND tokens, with their
    # own DECODE metadata; the attention backend runs them through its decode path
    mixed_decode: ForwardBatch | None = None

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE
