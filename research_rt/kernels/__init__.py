"""C++ CPU kernels as `torch.library` custom ops (csrc/), with fake implementations so compiled
graphs call them; callers keep a pure-PyTorch path for when they are unavailable (build.py)."""

from research_rt.kernels.build import (
    amx_linear_available,
    argmax_op,
    decode_attention_op,
    decode_attention_vectorized,
    extend_attention_op,
    forget_packed_weights,
    gemv_op,
    packed_weight_count,
    q4_linear_op,
    rms_norm_op,
    rotary_op,
    silu_mul_op,
    store_rows_op,
)

__all__ = [
    "amx_linear_available",
    "argmax_op",
    "decode_attention_op",
    "decode_attention_vectorized",
    "extend_attention_op",
    "forget_packed_weights",
    "gemv_op",
    "packed_weight_count",
    "q4_linear_op",
    "rms_norm_op",
    "rotary_op",
    "silu_mul_op",
    "store_rows_op",
]
