"""The C++ CPU ops (csrc/*.cpp), built into one extension on first use with `torch.utils.cpp_extension`.

`argmax_op()`, `decode_attention_op()`, `extend_attention_op()`, `gemv_op()`, `q4_linear_op()`,
`rms_norm_op()`, `rotary_op()`, `silu_mul_op()` and `store_rows_op()` return
`torch.ops.research_rt.<name>` once the extension has been compiled and loaded, or None: no compiler,
a failed build, or `RESEARCH_RT_CPU_KERNELS=0`.
Callers then take their pure-PyTorch path, which computes the same thing. The build goes to
`$RESEARCH_RT_EXT_DIR` (default `~/.cache/research_rt/ext`), in a folder named after the CPU's vector
capability (the code is built with -march=native), so later starts only load it (`make install`
builds it ahead). Fake (meta) implementations are registered, so torch.compile graphs call the ops.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _build_dir() -> Path:
    root = os.environ.get("RESEARCH_RT_EXT_DIR") or Path.home() / ".cache" / "research_rt" / "ext"
    path = Path(root) / f"torch{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load() -> bool:
    from torch.utils.cpp_extension import load

    load(
        name="research_rt_cpu_kernels",
        sources=[str(s) for s in _SOURCES],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],  # ATen's parallel_for needs OpenMP
        extra_ldflags=["-fopenmp"],
        build_directory=str(_build_dir()),
        is_python_module=False,
        verbose=False,
    )

    @torch.library.register_fake("research_rt::decode_attention")
    def _(q, k_buf, v_buf, kv_indices, attn_mask, scale):
        return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])

    @torch.library.register_fake("research_rt::extend_attention")
    def _(q, k_buf, v_buf, kv_indices, prefix_lens, extend_lens, scale, products=0):
        return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])

    @torch.library.register_fake("research_rt::argmax_rows")
    def _(x):
        return x.new_empty(x.shape[0], dtype=torch.int64)

    @torch.library.register_fake("research_rt::amx_linear")
    def _(x, w, bias):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("research_rt::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("research_rt::rotary")
    def _(positions, q, k, cos, sin):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    @torch.library.register_fake("research_rt::silu_mul")
    def _(x):
        return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)

    @torch.library.register_fake("research_rt::store_rows")
    def _(buf, slots, rows):
        return None

    @torch.library.register_fake("research_rt::q4_linear")
    def _(x, codes, scales, group, n):
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("research_rt::gemv")
    def _(x, w, bias):
        return x.new_empty(x.shape[0], w.shape[0])

    return True


@torch.compiler.assume_constant_result  # compiled graphs ask too (row ops): a constant, no lock traced
def _loaded() -> bool:
    if os.environ.get("RESEARCH_RT_CPU_KERNELS", "1") == "0":
        return False
    with _lock:
        if "ok" not in _state:
            try:
                _state["ok"] = _load()
            except Exception as exc:  # no compiler, headers, or a build error: fall back
                logger.warning("CPU kernels unavailable (%s); using the PyTorch paths", exc)
                _state["ok"] = False
    return _state["ok"]


@functools.cache
def amx_linear_available() -> bool:
    """Whether the gemv op's bfloat16 path runs on AMX tiles here (csrc/amx_linear.cpp): this build
    has them and the kernel let the process use them. `research_rt::amx_linear` is that kernel."""
    return _loaded() and torch.ops.research_rt.amx_linear_available()


def argmax_op():
    """`research_rt::argmax_rows` (csrc/argmax.cpp): torch.argmax(x, -1) for [B, V] float32, or None."""
    return torch.ops.research_rt.argmax_rows if _loaded() else None


def decode_attention_op():
    """`research_rt::decode_attention` (csrc/decode_attention.cpp), or None (module docstring)."""
    return torch.ops.research_rt.decode_attention if _loaded() else None


@functools.cache
def decode_attention_vectorized(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `decode_attention` runs its AVX-512 path for this dtype and head size (AVX512-BF16
    for bfloat16): only that path beats Inductor's fused decode beyond batch 1 (RESULTS.md)."""
    if dtype not in (torch.float32, torch.bfloat16) or not _loaded():
        return False
    width = torch.ops.research_rt.decode_attention_vector_width(dtype == torch.bfloat16)
    return width > 0 and head_dim % width == 0


@functools.cache  # asked by every layer of every extend step
def extend_attention_op(dtype: torch.dtype, head_dim: int):
    """`research_rt::extend_attention` (csrc/extend_attention.cpp) where this build runs it for the
    dtype and head size (bfloat16 or float32 on AVX512-BF16), or None: the caller runs SDPA."""
    if not _loaded() or not torch.ops.research_rt.extend_attention_supported(dtype, head_dim):
        return None
    return torch.ops.research_rt.extend_attention


def rms_norm_op():
    """`research_rt::rms_norm` (csrc/rms_norm_silu.cpp): models/layers/norm.py's RMSNorm in one pass
    over each row, for float32/bfloat16 CPU inference (eager and compiled); or None."""
    return torch.ops.research_rt.rms_norm if _loaded() else None


def rotary_op():
    """`research_rt::rotary` (csrc/rotary.cpp): models/layers/rotary.py's rotation of q and k in one
    pass, with the same roundings, for float32/bfloat16 CPU inference (eager and compiled); or None."""
    return torch.ops.research_rt.rotary if _loaded() else None


def silu_mul_op():
    """`research_rt::silu_mul` (csrc/rms_norm_silu.cpp): silu(gate) * up of a fused gate_up
    projection in one pass, for float32/bfloat16 CPU inference (eager and compiled); or None."""
    return torch.ops.research_rt.silu_mul if _loaded() else None


def store_rows_op():
    """`research_rt::store_rows` (csrc/store_rows.cpp): `buf.index_copy_(0, slots, rows)` as one
    memcpy per row, for eager CPU code writing K/V rows into the pool; or None."""
    return torch.ops.research_rt.store_rows if _loaded() else None


def forget_packed_weights() -> None:
    """Make the gemv op pack every weight again on its next call (csrc/panel_linear.cpp keeps a
    packed copy per bfloat16 weight). In-place ops on a parameter bump its version counter, which the
    op checks; writes through `.data` do not, so whatever writes weights that way calls this (the
    loader after loading or updating weights, the updates' rollback, research code that edits
    `p.data`)."""
    if _state.get("ok"):  # nothing is packed before the extension loads
        torch.ops.research_rt.forget_packed_weights()


def packed_weight_count() -> int:
    """How many weight copies the gemv op has packed in this process (tests: decode steps reuse them)."""
    return torch.ops.research_rt.packed_weight_count() if _loaded() else 0


@functools.cache
def q4_linear_op():
    """`research_rt::q4_linear` (csrc/q4_linear.cpp): 4-bit weight-only linears for bfloat16 rows,
    in the layout models/layers/packed_weight.py packs, where this build runs it (AVX512-BF16); or
    None: the caller uses ATen's int4 kernel."""
    if not _loaded() or not torch.ops.research_rt.q4_linear_supported():
        return None
    return torch.ops.research_rt.q4_linear


def gemv_op():
    """`research_rt::gemv` (csrc/gemv.cpp), or None (module docstring)."""
    return torch.ops.research_rt.gemv if _loaded() else None
