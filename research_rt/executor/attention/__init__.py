"""Attention backends (`--attention-backend`); the interface is in base.py."""

from __future__ import annotations

from research_rt.executor.attention.base import AttentionBackend
from research_rt.executor.attention.torch_native import TorchNativeAttnBackend

BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch_native": TorchNativeAttnBackend,
}
DEFAULT_BACKEND = "torch_native"


def create_backend(name: str | None) -> AttentionBackend:
    """The backend called `name` (None: the default)."""
    name = name or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {sorted(BACKENDS)}, got {name!r}")
    return BACKENDS[name]()


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "AttentionBackend", "create_backend"]
