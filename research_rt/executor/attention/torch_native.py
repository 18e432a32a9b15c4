"""Attention over the token-level KV pool in PyTorch (the reference backend; CPU and GPU), with the
C++ CPU ops where they run.

Extend: keys and values are gathered from the pool into a padded [B, KVH, Lk, D] layout with one
batched index, and `scaled_dot_product_attention` runs over all requests at once with an explicit
mask (grouped-query heads via `enable_gqa`); no Python loop over requests. On CPUs with
AVX512-BF16, bfloat16 and float32 extends run the `extend_attention` op instead, straight over the
pool and without the padding, every one of them: a request's rows must have the same bits alone,
beside others and over a cached prefix. SDPA for one long prompt where the op's products are
float32, up to 1.4x faster on an Intel Xeon without AMX, gave such a prompt other bits than the op
gives it in a batch (4 of 8 requests sharing a 300-token prefix got other greedy tokens alone than
together, 2026-12-07); float32 extends took SDPA until 2026-12-08, and a suffix over its cached
prefix got other last bits than inside its whole prompt (19 of 45 cases).
Decode: the `decode_attention` op, or its equivalent in products and sums for Inductor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from research_rt.core.forward_batch import ForwardBatch, ForwardMode
from research_rt.executor.attention.base import AttentionBackend
from research_rt.kernels import (
    decode_attention_op,
    extend_attention_op,
    store_rows_op,
)


def store_kv(
    k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """k_buf[slots] = k and v_buf[slots] = v: the C++ `store_rows` op in eager CPU code (one memcpy
    per row; ATen's index_copy_ goes element by element), `index_copy_` in compiled graphs."""
    eager = not (torch.compiler.is_compiling() or torch.is_grad_enabled())
    op = store_rows_op() if eager and k_buf.device.type == "cpu" else None
    if op is not None:
        op(k_buf, slots, k.to(k_buf.dtype))
        op(v_buf, slots, v.to(v_buf.dtype))
        return
    k_buf.index_copy_(0, slots, k.to(k_buf.dtype))
    v_buf.index_copy_(0, slots, v.to(v_buf.dtype))


@dataclass
class TorchNativeMetadata:
    """`kv_indices[b, j]`: the slot of request b's j-th key (0, the dummy slot, past its length);
    `attn_mask[b, 0, i, j]`: whether query i of request b sees key j. EXTEND only: `q_gather[b, i]`
    indexes the flat extend tokens (padding indexes one past the end), `q_scatter[t]` indexes the
    padded [B * Lq] layout back, and each request's cached and new token counts (for the op)."""

    kv_indices: torch.Tensor  # [B, Lk]
    attn_mask: torch.Tensor  # [B, 1, Lq, Lk] bool
    q_gather: torch.Tensor | None = None  # [B, Lq]
    q_scatter: torch.Tensor | None = None  # [T]
    prefix_lens: torch.Tensor | None = None  # [B] int64
    extend_lens: torch.Tensor | None = None  # [B] int64


def build_attention_metadata(
    mode: ForwardMode,
    prefix_lens: list[int],
    extend_lens: list[int],
    kv_rows: torch.Tensor,
    pad_kv_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """kv_indices, attn_mask, q_gather, q_scatter for requests whose slots are `kv_rows[b, :len_b]`.

    Request b has `prefix_lens[b]` cached keys and `extend_lens[b]` new tokens (1 in DECODE); its
    query i sits at position prefix_lens[b] + i and sees keys [0, prefix_lens[b] + i].
    """
    bs = len(prefix_lens)
    prefix = torch.tensor(prefix_lens, dtype=torch.int64)
    extend = torch.tensor(extend_lens, dtype=torch.int64)
    seq = prefix + extend
    lk = int(seq.max()) if pad_kv_to is None else pad_kv_to
    lq = int(extend.max())
    key_pos = torch.arange(lk)
    kv_indices = kv_rows[:, :lk].clone()
    kv_indices[key_pos[None, :] >= seq[:, None]] = 0
    q_pos = prefix[:, None] + torch.arange(lq)[None, :]  # [B, Lq]
    q_valid = torch.arange(lq)[None, :] < extend[:, None]
    mask = key_pos[None, None, :] <= q_pos[:, :, None]  # causal, [B, Lq, Lk]
    mask &= q_valid[:, :, None]
    mask[:, :, 0] |= ~q_valid  # padded queries look at the dummy key only (no all-masked rows)
    mask = mask.unsqueeze(1)
    if mode is ForwardMode.DECODE:
        return kv_indices, mask, None, None
    total = int(extend.sum())
    starts = torch.cumsum(extend, 0) - extend
    q_gather = starts[:, None] + torch.arange(lq)[None, :]
    q_gather[~q_valid] = total
    q_scatter = (torch.arange(bs)[:, None] * lq + torch.arange(lq)[None, :])[q_valid]
    return kv_indices, mask, q_gather, q_scatter


_OP_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ decode op computes in


class TorchNativeAttnBackend(AttentionBackend):
    """Batched SDPA over gathered KV. Works on any device torch supports."""

    name = "torch_native"
    metadata_cls = TorchNativeMetadata

    def __init__(self) -> None:
        # the C++ decode op (research_rt/kernels) where it builds; None: the PyTorch code below
        self.decode_op = decode_attention_op()

    def build_metadata(self, mode, prefix_lens, extend_lens, kv_rows, device="cpu") -> TorchNativeMetadata:
        kv_indices, mask, q_gather, q_scatter = build_attention_metadata(
            mode, prefix_lens, extend_lens, kv_rows
        )
        if mode is ForwardMode.DECODE:
            return TorchNativeMetadata(kv_indices.to(device), mask.to(device))
        return TorchNativeMetadata(
            kv_indices.to(device),
            mask.to(device),
            q_gather.to(device),
            q_scatter.to(device),
            torch.tensor(prefix_lens, dtype=torch.int64, device=device),
            torch.tensor(extend_lens, dtype=torch.int64, device=device),
        )

    def pad_for_graph(self, metadata: TorchNativeMetadata, bucket: int, kv_len: int) -> TorchNativeMetadata:
        bs, lk = metadata.kv_indices.shape
        pad_rows = bucket - bs
        kv = F.pad(metadata.kv_indices, (0, kv_len - lk, 0, pad_rows))
        mask = F.pad(metadata.attn_mask, (0, kv_len - lk, 0, 0, 0, 0, 0, pad_rows))
        if pad_rows:
            mask[bs:, 0, 0, 0] = True  # padding rows see only the dummy slot
        return TorchNativeMetadata(kv, mask)

    def dynamic_dims(self) -> dict[str, int]:
        return {"kv_indices": 1, "attn_mask": 3}

    def key_length(self, metadata: TorchNativeMetadata) -> int:
        return metadata.kv_indices.shape[1]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, batch: ForwardBatch
    ) -> torch.Tensor:
        pool = batch.kv_pool
        k_buf = pool.k_buffers[layer.layer_id]
        v_buf = pool.v_buffers[layer.layer_id]
        store_kv(k_buf, v_buf, batch.out_cache_loc, k, v)

        if batch.mode is ForwardMode.DECODE:
            return self._decode(q, k_buf, v_buf, layer, batch)
        if batch.mixed_decode is not None:  # extend rows first, then one-token decode rows
            n = batch.mixed_decode.batch_size
            extend = self._extend(q[:-n], k_buf, v_buf, layer, batch)
            return torch.cat([extend, self._decode(q[-n:], k_buf, v_buf, layer, batch.mixed_decode)])
        return self._extend(q, k_buf, v_buf, layer, batch)

    @staticmethod
    def _extend(
        q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, layer, batch: ForwardBatch
    ) -> torch.Tensor:
        """Each request's new tokens over its cached and new keys: the C++ op (bfloat16 or float32,
        AVX512-BF16) where it runs, else SDPA."""
        meta = batch.attn_metadata
        op = extend_attention_op(q.dtype, layer.head_dim) if q.device.type == "cpu" else None
        if op is not None and q.dtype == k_buf.dtype:
            return op(q, k_buf, v_buf, meta.kv_indices, meta.prefix_lens, meta.extend_lens, layer.scaling)
        return TorchNativeAttnBackend._sdpa_extend(q, k_buf, v_buf, layer, batch)

    @staticmethod
    def _sdpa_extend(
        q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, layer, batch: ForwardBatch
    ) -> torch.Tensor:
        """SDPA: on CPU one call per request over exactly its keys, so a request's bits do not depend
        on the batch; elsewhere one padded call for the batch. CPU SDPA over a padded batch gave a
        request other bits than alone (heads of 16: 5 of 11 lengths in bfloat16, 9 of 11 in float32),
        and a tiny Llama in bfloat16 other greedy tokens in a batch."""
        meta = batch.attn_metadata
        if q.device.type == "cpu":
            return TorchNativeAttnBackend._sdpa_each(q, k_buf, v_buf, layer, meta)
        keys = k_buf[meta.kv_indices].transpose(1, 2).to(q.dtype)  # [B, KVH, Lk, D]
        values = v_buf[meta.kv_indices].transpose(1, 2).to(q.dtype)
        padded = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[meta.q_gather]  # [B, Lq, H, D]
        queries = padded.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=meta.attn_mask,
            scale=layer.scaling,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )  # [B, H, Lq, D]
        out = out.transpose(1, 2).reshape(-1, layer.num_heads * layer.head_dim)
        return out[meta.q_scatter]

    @staticmethod
    def _sdpa_each(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, layer, meta) -> torch.Tensor:
        """Request by request: its new queries [1, H, e, D] over its p + e keys, unpadded."""
        outs, start = [], 0
        gqa = layer.num_heads != layer.num_kv_heads
        for b, (p, e) in enumerate(zip(meta.prefix_lens.tolist(), meta.extend_lens.tolist())):
            slots = meta.kv_indices[b, : p + e]
            keys = k_buf[slots].transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, KVH, p + e, D]
            values = v_buf[slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            queries = q[start : start + e].transpose(0, 1).unsqueeze(0)  # [1, H, e, D]
            mask = meta.attn_mask[b : b + 1, :, :e, : p + e].contiguous()
            out = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, scale=layer.scaling, enable_gqa=gqa
            )
            outs.append(out[0].transpose(0, 1).reshape(e, -1))
            start += e
        return torch.cat(outs)

    def _decode(
        self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, layer, batch: ForwardBatch
    ) -> torch.Tensor:
        """One query per request, written out (no SDPA kernel launch per layer): the query heads of
        a KV group share one matmul against that group's keys; softmax in float32. On CPU the C++
        op does the same reading each pool row once, without gathering keys into a padded tensor."""
        bs, kvh, d = batch.batch_size, layer.num_kv_heads, layer.head_dim
        group = layer.num_heads // kvh
        meta = batch.attn_metadata
        # Every batch, eager and compiled: the same op, the same bits (a step compiled and the same step
        # eager, as in the window before the compiled step is ready, must agree). Batch 1: 3-5x
        # Inductor's fused decode; batch 64 in bfloat16 from DRAM 1.9x where its AVX-512 path runs; its
        # portable loops (head sizes the vectors do not divide) were slower (RESULTS.md), but the
        # einsum below and Inductor's fusion of `_decode_fused` gave other bits: a tiny Llama with
        # 16-wide heads changed 7 of 12 greedy continuations with compile on.
        use_op = (
            self.decode_op is not None and q.device.type == "cpu" and q.dtype == k_buf.dtype in _OP_DTYPES
        )
        if use_op:
            queries = q.reshape(bs, layer.num_heads, d)
            return self.decode_op(queries, k_buf, v_buf, meta.kv_indices, meta.attn_mask, layer.scaling)
        keys = k_buf[meta.kv_indices].to(q.dtype)  # [B, Lk, KVH, D]
        values = v_buf[meta.kv_indices].to(q.dtype)
        if torch.compiler.is_compiling():
            return _decode_fused(q.view(bs, kvh, group, d), keys, values, meta.attn_mask, layer.scaling)
        queries = q.view(bs, kvh, group, d)
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = torch.einsum("bhgd,bkhd->bhgk", queries, keys).to(acc) * layer.scaling
        scores = scores.masked_fill(~meta.attn_mask.view(bs, 1, 1, -1), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.einsum("bhgk,bkhd->bhgd", probs, values)
        return out.reshape(bs, layer.num_heads * d)


def _decode_fused(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The same decode attention as products and sums, for Inductor: it fuses the gather from the
    KV pool into both reductions, so each cached key and value is read once and never copied into a
    padded [B, Lk, ...] tensor (at batch 64 that copy dominated the step)."""
    bs, kvh, group, d = queries.shape
    q = queries.float()
    scores = (q[:, None, :, :, :] * keys.float()[:, :, :, None, :]).sum(-1) * scaling  # [B, Lk, KVH, G]
    scores = scores.masked_fill(~mask.view(bs, -1, 1, 1), float("-inf"))
    probs = torch.softmax(scores, dim=1)
    out = (probs[..., None] * values.float()[:, :, :, None, :]).sum(1)  # [B, KVH, G, D]
    return out.to(queries.dtype).reshape(bs, kvh * group * d)
