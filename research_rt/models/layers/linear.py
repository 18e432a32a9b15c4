"""Linear layers that run fast on CPU, and give each row the same bits in any batch.

For few rows (decode) a matrix-vector product is bound by reading the weight once from memory,
and oneDNN/MKL reach a fraction of the memory bandwidth on small CPUs. On CPU every linear of a
float32 or bfloat16 model goes through the C++ `research_rt::gemv` op
(research_rt/kernels/csrc/gemv.cpp) where it builds: in the compiled decode step, in eager decode
steps (while the compiled step builds, or with compile off) and in prefill. bfloat16 on AVX512-BF16
runs outer products over the weight packed once into column panels (csrc/panel_linear.cpp; the
packed copy follows in-place edits of the weight, and writes through `.data` call
`kernels.forget_packed_weights`), each output one float32 chain over K whatever the number of rows:
a row's bits never depend on its batch, chunk or the requests beside it. oneDNN's bfloat16 GEMM
gave some rows of SmolLM2's down_proj (K = 1536) other bits at 16-31 rows than at 32 and more, so a
request's greedy tokens could depend on how its prompt was batched. All of SmolLM2-135M's linears,
Zen 5, 2 threads: 6.6 ms for one row (40 GB/s of weights), 11.5 ms for 8, 49 ms for 64, against
58 ms for oneDNN with prepacked weights; 32 / 128 / 512 / 2048 rows 24 / 92 / 352-395 / 1428 ms
against `F.linear`'s 52 / 119 / 400-407 / 1461-1572 (benchmarks/RESULTS.md). On Intel Xeons, whose
VDPBF16PS issues at about half the FMA rate, batches of 16 rows and more run the same arithmetic as
float32 FMAs, 1.7x faster (panel_linear.cpp). float32 streams each
weight once for up to 8 rows (16 take two passes) and hands more rows to oneDNN's GEMM. On CPUs with
AMX the op runs bfloat16 on tiles at every row count (csrc/amx_linear.cpp).
Without the op a single row under compile takes Inductor's `(w * x).sum(-1)`, one vectorised loop
that streams the weight in its own dtype and accumulates in float32; everything else `F.linear`.

For Inductor's loop the row `x` is materialized first (`materialize`, an opaque copy): left to itself Inductor inlines
x's producer into the weight loop and recomputes it for every output row — the SiLU before
`down_proj` ran 576 times per element, the RMSNorm before `qkv_proj` 960 times. Materializing
made the batch-1 decode step 1.6x faster (16.2 -> 9.9 ms, SmolLM2-135M bfloat16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from research_rt.kernels import gemv_op
from research_rt.models.layers.packed_weight import PackedWeight

GEMV_MAX_ROWS = 1
_GEMV_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ gemv op computes in


@torch.library.custom_op("research_rt::materialize", mutates_args=())
def materialize(x: torch.Tensor) -> torch.Tensor:
    """A copy Inductor cannot see through: the compiled graph computes `x` once, into memory."""
    return x.clone()


@materialize.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.compiler.assume_constant_result  # traced as a constant: no lock or lookup inside the graph
def _gemv_available() -> bool:
    return gemv_op() is not None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: PackedWeight | None = None,
) -> torch.Tensor:
    """x @ weight.T + bias; a weight that is `packed` (quant.py) takes its weight-only kernel (for a
    single row, or any rows where `packed.any_rows`); else on CPU the gemv op (or for one row
    without it, under compile, the streaming loop)."""
    if packed is not None and x.dim() == 2 and (x.shape[0] <= GEMV_MAX_ROWS or packed.any_rows):
        out = packed.matmul(x)
        return out if bias is None else out + bias
    if (
        x.dim() == 2
        and x.device.type == "cpu"
        and x.dtype == weight.dtype in _GEMV_DTYPES
        and _gemv_available()
    ):
        return torch.ops.research_rt.gemv(x, weight, bias)  # any rows (it picks its kernel)
    if x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and torch.compiler.is_compiling():
        x = materialize(x)
        out = (weight[:, None, :].float() * x[None, :, :].float()).sum(-1).t()
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
    return F.linear(x, weight, bias)


def pack_linear_weights(model: nn.Module) -> None:
    """Have the gemv op pack the weights its linears multiply by now, not in the first request (its
    bfloat16 kernel keeps a packed copy per weight: SmolLM2's first request took ~0.6 s longer):
    every CPU `Linear`, and the input embedding where the LM head is tied to it. Copies that are
    current are kept; weights changed in place (version counter) or after `forget_packed_weights`
    are packed again."""
    weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
    if getattr(model, "lm_head", ...) is None:  # tied: compute_logits multiplies by embed_tokens
        weights.append(model.get_submodule("model.embed_tokens").weight)
    weights = [w for w in weights if w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.dim() == 2]
    if not weights or not _gemv_available():  # only bfloat16 CPU weights are packed
        return
    with torch.inference_mode():
        for w in weights:
            linear(w.new_zeros(1, w.shape[1]), w)


class Linear(nn.Linear):
    """nn.Linear whose forward goes through `linear` (same parameters, same checkpoint names)."""

    packed: PackedWeight | None = None  # set by quant.quantize_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)
