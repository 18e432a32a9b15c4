"""Token-level KV storage (page size 1) and the request -> token-slot table.

KVPool:  per layer a `k` and a `v` tensor of shape [num_slots + 1, kv_heads, head_dim]. Slot 0 is a
         dummy that padded tokens write into and padded attention reads from (always finite).
ReqToTokenPool: an int32 table [max_reqs + 1, context_len]; row r, column p holds the KV slot of
         token p of the request living in row r. The last row is a dummy row for padding.
"""

from __future__ import annotations

import torch


class KVPool:
    """Fixed-size pool of KV slots with a free list."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.size = num_slots
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (num_slots + 1, kv_heads, head_dim)
        # Only the dummy slot is zeroed: every other slot is written by the forward that allocates
        # it before any attention reads it, and padding reads only slot 0. Zeroing the whole pool
        # (1.5 GB for SmolLM2 on CPU) took ~3 s of every start-up; untouched pages cost nothing.
        self.k_buffers = [_empty_with_zero_dummy(shape, dtype, device) for _ in range(num_layers)]
        self.v_buffers = [_empty_with_zero_dummy(shape, dtype, device) for _ in range(num_layers)]
        self.clear()

    def clear(self) -> None:
        self.free_slots = torch.arange(1, self.size + 1, dtype=torch.int64)

    def available_size(self) -> int:
        return int(self.free_slots.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        """Take `n` free slots, or return None (and take nothing) when fewer are free."""
        if n > self.free_slots.numel():
            return None
        out, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self.free_slots = torch.cat([self.free_slots, slots.to(torch.int64).cpu()])

    def bytes_per_token(self) -> int:
        k = self.k_buffers[0]
        return 2 * self.num_layers * k.shape[1] * k.shape[2] * k.element_size()


def _empty_with_zero_dummy(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device)
    buf[0].zero_()
    return buf


class ReqToTokenPool:
    """Rows of token-slot indices, one row per running request."""

    def __init__(self, max_reqs: int, context_len: int, device: torch.device | str) -> None:
        self.size = max_reqs
        self.context_len = context_len
        self.table = torch.zeros((max_reqs + 1, context_len + 1), dtype=torch.int64, device=device)
        self.dummy_row = max_reqs
        self.clear()

    def clear(self) -> None:
        self.free_rows = list(range(self.size))

    def available_size(self) -> int:
        return len(self.free_rows)

    def alloc(self) -> int | None:
        return self.free_rows.pop() if self.free_rows else None

    def free(self, row: int) -> None:
        assert row not in self.free_rows, f"row {row} freed twice"
        self.free_rows.append(row)
