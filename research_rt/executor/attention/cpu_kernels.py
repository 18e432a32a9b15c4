"""The C++ CPU attention ops (csrc/), built on first use with `torch.utils.cpp_extension`.

`decode_attention_op()` returns `torch.ops.research_rt.decode_attention` once the extension has
been compiled and loaded, or None: no compiler, a failed build, or `RESEARCH_RT_CPU_KERNELS=0`.
Callers then take the pure-PyTorch path (torch_native.py), which computes the same thing.
The build goes to `$RESEARCH_RT_EXT_DIR` (default `~/.cache/research_rt/ext`), in a folder named
after the CPU's vector capability (the code is built with -march=native), so later starts only
load it. A fake (meta) implementation is registered, so torch.compile graphs call the op.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / "decode_attention.cpp"]
_lock = threading.Lock()
_state: dict[str, object] = {}


def _build_dir() -> Path:
    root = os.environ.get("RESEARCH_RT_EXT_DIR") or Path.home() / ".cache" / "research_rt" / "ext"
    path = Path(root) / f"torch{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load() -> bool:
    from torch.utils.cpp_extension import load

    load(
        name="research_rt_cpu_attention",
        sources=[str(s) for s in _SOURCES],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(_build_dir()),
        is_python_module=False,
        verbose=False,
    )

    @torch.library.register_fake("research_rt::decode_attention")
    def _(q, k_buf, v_buf, kv_indices, attn_mask, scale):
        return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])

    return True


def decode_attention_op():
    """The compiled decode-attention op, or None when it is unavailable (see module docstring)."""
    if os.environ.get("RESEARCH_RT_CPU_KERNELS", "1") == "0":
        return None
    with _lock:
        if "ok" not in _state:
            try:
                _state["ok"] = _load()
            except Exception as exc:  # no compiler, headers, or a build error: fall back
                logger.warning("CPU attention kernels unavailable (%s); using the PyTorch path", exc)
                _state["ok"] = False
    return torch.ops.research_rt.decode_attention if _state["ok"] else None
