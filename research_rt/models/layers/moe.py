"""Mixture-of-experts building blocks: top-k routing and expert dispatch.

`FusedExperts` keeps every expert's gate and up projections fused in one tensor
`w13[E, 2 * I, H]` (gate rows first, then up) and the down projections in `w2[E, H, I]`.

The dispatches compute the same sum over each token's k choices of weight * expert(x):
- grouped: the (token, choice) pairs are sorted by expert and each expert runs one matmul over
  its contiguous slice (a Python loop over experts, never over tokens). The slice bounds are the
  per-expert counts read back with `.tolist()`: torch.compile cannot trace it (fullgraph) and a CUDA
  graph cannot capture it. Its products go through `linear()` (on CPU the gemv op, whose rows keep
  their bits at any row count) and SiLU-and-mul through the row op, and a token's k results are
  added in expert order: a token's output has the same bits alone, in any batch, eager or compiled.
- grouped_op: the grouped dispatch as a custom op, opaque to the compiler. On CPU reading the
  counts is no device sync, so every CPU step uses grouped (eager) or grouped_op (compiled).
- gathered: each pair gathers its own expert's weights (`w13[topk_ids]`), no data-dependent shape.
  Used by compiled steps off CPU and captured steps when T * k < E. Under compile each pair is a
  weight-streaming matrix-vector loop that Inductor fuses with the gather: only the chosen
  experts' weights are read, once.
- dense: every expert on every token, weighted by a [T, E] combine matrix that is 0 off the chosen
  experts; no host sync. For CUDA-graph captures (and compiled steps off CPU) when T * k >= E.
- cond: the compiled dynamic-batch graph off CPU (T unknown at trace time) holds gathered and the
  large dispatch under one torch.cond on T * k < E, chosen at run time without a recompile.
`select_dispatch` chooses; benchmarks/bench_moe.py has the measurements behind it (dense was the
slowest on CPU at every batch size of the moderate config; gathered the fastest while T * k < E,
but its bits are Inductor's, not the eager step's: on CPU correctness wins, the grouped dispatch
serves every step).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from research_rt.models.layers.activation import silu_and_mul
from research_rt.models.layers.linear import linear, materialize

DISPATCHES = ("grouped", "grouped_op", "gathered", "dense", "cond")


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts (float32), keep the top k; optionally renormalize them to sum to 1.

    Returns (weights [T, k] float32, expert ids [T, k] int64), as transformers' routers do."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def select_dispatch(
    num_tokens: int | torch.SymInt,
    top_k: int,
    num_experts: int,
    device_type: str,
    compiling: bool,
    capturing: bool,
) -> str:
    """The dispatch for T = num_tokens tokens (a SymInt in the dynamic-batch compiled graph).

    Eager: grouped. CPU, compiled: grouped_op at every T (the eager step's bits). Compiled off CPU or
    graph-captured: gathered when T * k < E, else dense. When T is dynamic and the comparison is not
    known without a guard (which would split the dynamic-batch graph), "cond": both, chosen at run
    time by torch.cond."""
    if not (compiling or capturing):
        return "grouped"
    if device_type == "cpu" and not capturing:
        return "grouped_op"
    if statically_known_true(num_tokens * top_k < num_experts):
        return "gathered"
    if statically_known_true(num_tokens * top_k >= num_experts):
        return large_dispatch(device_type, capturing)
    return "cond"


def graph_capture_active(x: torch.Tensor) -> bool:
    """Whether `x`'s stream is being captured into a CUDA graph (no host sync may happen)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def large_dispatch(device_type: str, capturing: bool) -> str:
    return "grouped_op" if device_type == "cpu" and not capturing else "dense"


def grouped_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    num_tokens, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    # sort the T*k (token, choice) pairs by expert: each expert's inputs become one slice
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // k
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    xs = x[token_of]
    out = torch.empty_like(xs)
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        act = silu_and_mul(linear(xs[start : start + n], w13[expert]))
        out[start : start + n] = linear(act, w2[expert])
        start += n
    out = out * topk_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, out)


@torch.library.custom_op("research_rt::moe_grouped", mutates_args=())
def moe_grouped(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """`grouped_experts` as one op the compiler does not trace into (its output is [T, H])."""
    return grouped_experts(x, w13, w2, topk_weights, topk_ids)


@moe_grouped.register_fake
def _(x, w13, w2, topk_weights, topk_ids):
    return torch.empty_like(x)


def gathered_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    stream: bool,
) -> torch.Tensor:
    """Each (token, choice) pair with its own expert's weights. `stream` (under compile): each pair
    is `(w[e] * x).sum(-1)`, which Inductor fuses with the gather into one loop over the chosen
    weights (accumulating in float32; the vector is materialized first, see linear.py); else the
    gathered weights feed batched matmuls."""
    num_tokens, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    xs = x.unsqueeze(1).expand(num_tokens, k, x.shape[-1]).reshape(num_tokens * k, x.shape[-1])
    if stream:
        gate_up = (w13[flat_ids].float() * materialize(xs)[:, None, :].float()).sum(-1).to(x.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        h = materialize(F.silu(gate) * up)
        out = (w2[flat_ids].float() * h[:, None, :].float()).sum(-1)
    else:
        gate, up = torch.bmm(w13[flat_ids], xs.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
        out = torch.bmm(w2[flat_ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1).float()
    out = out.view(num_tokens, k, -1) * topk_weights.unsqueeze(-1)
    return out.sum(dim=1).to(x.dtype)


def dense_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Every expert on every token (two batched matmuls), combined with weights that are 0 off
    each token's chosen experts (`where`, so an unchosen expert's inf or nan cannot leak in)."""
    num_experts = w13.shape[0]
    xe = x.unsqueeze(0).expand(num_experts, *x.shape)
    gate, up = torch.bmm(xe, w13.transpose(1, 2)).chunk(2, dim=-1)
    y = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))  # [E, T, H]
    combine = torch.zeros(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
    combine = combine.scatter(1, topk_ids, topk_weights.float()).t().unsqueeze(-1)  # [E, T, 1]
    chosen = torch.zeros(x.shape[0], num_experts, dtype=torch.bool, device=x.device)
    chosen = chosen.scatter(1, topk_ids, True).t().unsqueeze(-1)
    return torch.where(chosen, y.float() * combine, 0.0).sum(dim=0).to(x.dtype)


class FusedExperts(nn.Module):
    """E SwiGLU experts with fused gate/up weights."""

    # None: `select_dispatch` decides; one of DISPATCHES forces it (tests, benchmarks/bench_moe.py)
    dispatch: str | None = None

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; topk_* [T, k] -> sum over the k choices of weight * expert(x)."""
        compiling = torch.compiler.is_compiling()
        kind = self.dispatch or select_dispatch(
            x.shape[0],
            topk_ids.shape[1],
            self.num_experts,
            x.device.type,
            compiling,
            graph_capture_active(x),
        )
        if kind == "cond":
            large = large_dispatch(x.device.type, capturing=False)
            return torch.cond(
                x.shape[0] * topk_ids.shape[1] < self.num_experts,
                self._gathered_streamed,
                self._dense if large == "dense" else self._grouped_op,
                (x, topk_weights, topk_ids),
            )
        if kind == "gathered":
            return gathered_experts(x, self.w13, self.w2, topk_weights, topk_ids, stream=compiling)
        if kind == "dense":
            return dense_experts(x, self.w13, self.w2, topk_weights, topk_ids)
        if kind == "grouped_op":
            return moe_grouped(x, self.w13, self.w2, topk_weights, topk_ids)
        return grouped_experts(x, self.w13, self.w2, topk_weights, topk_ids)

    # torch.cond's branches (same operands, same [T, H] result)
    def _gathered_streamed(self, x, topk_weights, topk_ids):
        return gathered_experts(x, self.w13, self.w2, topk_weights, topk_ids, stream=True)

    def _grouped_op(self, x, topk_weights, topk_ids):
        return moe_grouped(x, self.w13, self.w2, topk_weights, topk_ids)

    def _dense(self, x, topk_weights, topk_ids):
        return dense_experts(x, self.w13, self.w2, topk_weights, topk_ids)

    def load_expert_weight(self, expert: int, kind: str, tensor: torch.Tensor) -> None:
        """kind: gate, up or down (one expert's HF tensor) into the fused storage."""
        inter = self.intermediate_size
        dst = {
            "gate": self.w13.data[expert, :inter],
            "up": self.w13.data[expert, inter:],
            "down": self.w2.data[expert],
        }[kind]
        if dst.shape != tensor.shape:
            raise ValueError(
                f"expert {expert} {kind}: checkpoint {tuple(tensor.shape)} vs {tuple(dst.shape)}"
            )
        dst.copy_(tensor)


# HF per-expert tensor names: Qwen2-MoE style (gate_proj/up_proj/down_proj) and Mixtral (w1/w3/w2)
EXPERT_NAME = re.compile(
    r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
EXPERT_KIND = {
    "gate_proj": "gate",
    "w1": "gate",
    "up_proj": "up",
    "w3": "up",
    "down_proj": "down",
    "w2": "down",
}


def parse_expert_name(name: str) -> tuple[str, int, str] | None:
    """`model.layers.0.mlp.experts.3.w1.weight` -> ("model.layers.0.mlp.experts", 3, "gate")."""
    m = EXPERT_NAME.match(name)
    if m is None:
        return None
    return m["prefix"], int(m["expert"]), EXPERT_KIND[m["proj"]]


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ an optional shared expert scaled by a sigmoid gate).

    Module names follow the HF checkpoints (`gate`, `experts`, `shared_expert`,
    `shared_expert_gate`). `forward(x, recorder)` reports the routing to `recorder` when given."""

    def __init__(
        self,
        layer_id: int,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        shared_expert: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert is not None else None

    def forward(self, x: torch.Tensor, recorder=None) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        if recorder is not None:
            recorder.record(self.layer_id, ids)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
