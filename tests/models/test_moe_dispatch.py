"""MoE expert dispatch (research_rt/models/layers/moe.py): every dispatch computes the grouped
dispatch's result, the choice follows the batch, compiled steps need no data-dependent shapes,
and what a CUDA-graph capture runs never syncs with the host."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

from research_rt.models.layers import moe
from research_rt.models.layers.moe import (
    FusedExperts,
    gathered_experts,
    grouped_experts,
    route,
    select_dispatch,
)


def make_experts(num_experts: int, hidden: int = 32, inter: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    layer = FusedExperts(num_experts, hidden, inter)
    with torch.no_grad():
        layer.w13.normal_(0, 0.3)
        layer.w2.normal_(0, 0.3)
    router = torch.randn(num_experts, hidden)
    return layer, router


def routed(router: torch.Tensor, num_tokens: int, top_k: int, seed: int = 1):
    torch.manual_seed(seed)
    x = torch.randn(num_tokens, router.shape[1])
    weights, ids = route(x @ router.t(), top_k, renormalize=False)
    return x, weights, ids


def reference(x: torch.Tensor, layer: FusedExperts, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token by token, choice by choice (what transformers' MoE blocks compute)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (layer.w13[e] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (layer.w2[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize(("experts", "top_k"), [(4, 2), (6, 3), (8, 2)])
@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("dispatch", ["grouped", "grouped_op", "gathered", "dense"])
def test_every_dispatch_matches_the_reference(dispatch, tokens, experts, top_k):
    layer, router = make_experts(experts)
    x, weights, ids = routed(router, tokens, top_k)
    layer.dispatch = dispatch
    with torch.inference_mode():
        got = layer(x, weights, ids)
    torch.testing.assert_close(got, reference(x, layer, weights, ids), atol=1e-5, rtol=1e-5)


def test_streamed_gather_matches_the_batched_matmul():
    layer, router = make_experts(8)
    x, weights, ids = routed(router, 3, 2)
    args = (x, layer.w13, layer.w2, weights, ids)
    with torch.inference_mode():
        torch.testing.assert_close(
            gathered_experts(*args, stream=True), gathered_experts(*args, stream=False), atol=1e-5, rtol=1e-5
        )


def test_dense_ignores_non_finite_unchosen_experts():
    layer, router = make_experts(4)
    x = torch.randn(5, 32)
    logits = x @ router.t()
    logits[:, 3] -= 1e4  # expert 3 is never chosen
    weights, ids = route(logits, 2, renormalize=False)
    assert not (ids == 3).any()
    with torch.no_grad():
        layer.w2[3].fill_(float("inf"))
    layer.dispatch = "dense"
    with torch.inference_mode():
        got = layer(x, weights, ids)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, grouped_experts(x, layer.w13, layer.w2, weights, ids))


def test_dispatch_choice():
    # eager (prefill, recording): grouped, whatever the size
    assert select_dispatch(1, 2, 8, "cpu", compiling=False, capturing=False) == "grouped"
    assert select_dispatch(512, 2, 8, "cuda", compiling=False, capturing=False) == "grouped"
    # compiled on CPU: the grouped op at every size (the eager step's bits)
    assert select_dispatch(1, 2, 8, "cpu", compiling=True, capturing=False) == "grouped_op"
    assert select_dispatch(4, 2, 8, "cpu", compiling=True, capturing=False) == "grouped_op"
    # fewer (token, choice) pairs than experts: gathered, compiled off CPU or captured
    assert select_dispatch(1, 2, 8, "cuda", compiling=True, capturing=False) == "gathered"
    assert select_dispatch(3, 2, 8, "cuda", compiling=False, capturing=True) == "gathered"
    # more: dense in a CUDA graph or compiled off CPU (no host sync)
    assert select_dispatch(4, 2, 8, "cuda", compiling=False, capturing=True) == "dense"
    assert select_dispatch(64, 2, 8, "cuda", compiling=True, capturing=False) == "dense"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_rows_keep_their_bits_in_any_batch(dtype):
    """A token's experts' output is the same alone as among other tokens: the grouped dispatch
    multiplies through `linear()` (the gemv op on CPU), whose rows keep their bits at any row count;
    F.linear's (oneDNN's) rows change bits with the count."""
    layer, router = make_experts(8, hidden=64, inter=96)
    layer = layer.to(dtype)
    x, weights, ids = routed(router, 40, 2, seed=4)
    x = x.to(dtype)
    with torch.inference_mode():
        batch = grouped_experts(x, layer.w13, layer.w2, weights, ids)
        for t in range(0, 40, 3):
            alone = grouped_experts(x[t : t + 1], layer.w13, layer.w2, weights[t : t + 1], ids[t : t + 1])
            assert torch.equal(batch[t : t + 1], alone), t


@pytest.mark.parametrize("tokens", [1, 2, 16])
def test_graph_capture_dispatch_never_reads_data_on_the_host(tokens, monkeypatch):
    """What a CUDA-graph capture runs (checked on CPU by pretending to capture) runs on fake tensors,
    which have no data: nothing in it reads a value back (a host sync on CUDA, fatal in a capture),
    so MoE models can be captured (model_runner no longer excludes them). The grouped dispatch
    cannot: its per-expert counts are data."""
    layer, router = make_experts(8)
    x, weights, ids = routed(router, tokens, 2)
    with torch.inference_mode():
        want = layer(x, weights, ids)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(t) for t in (x, weights, ids)]
    with torch.inference_mode(), mode, pytest.raises(DynamicOutputShapeException):
        layer(*fake)
    monkeypatch.setattr(moe, "graph_capture_active", lambda x: True)
    with torch.inference_mode(), mode:
        assert layer(*fake).shape == x.shape
    with torch.inference_mode():
        torch.testing.assert_close(layer(x, weights, ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", [None, "cond"])
def test_compiled_layer_matches_grouped_at_every_batch_size(dispatch):
    """fullgraph compile as the decode step does it: batch 1 static, 2+ one dynamic-batch graph. On
    CPU it runs the grouped op (None: the choice), bit for bit the eager result; "cond" (the choice
    off CPU, forced here) chooses gathered (T * k < E) or the large dispatch at run time without
    recompiling."""
    layer, router = make_experts(8)
    layer.dispatch = dispatch

    def step(x, weights, ids):
        return layer(x, weights, ids)

    compiled = torch.compile(step, fullgraph=True)
    with torch.inference_mode():
        for tokens in (1, 2, 3, 4, 9):
            x, weights, ids = routed(router, tokens, 2, seed=tokens)
            if tokens > 1:
                for t in (x, weights, ids):
                    torch._dynamo.mark_dynamic(t, 0, min=2, max=4096)
            got, want = compiled(x, weights, ids), grouped_experts(x, layer.w13, layer.w2, weights, ids)
            if dispatch is None:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dynamic_batch_graph_holds_both_branches():
    """The traced 2+ graph under the "cond" dispatch (the choice off CPU, forced here): a torch.cond
    whose large branch is the grouped op on CPU; the batch-1 graph is the gathered dispatch alone
    (no cond, no op)."""
    layer, router = make_experts(8)
    layer.dispatch = "cond"
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x, w, i: layer(x, w, i), backend=backend, fullgraph=True)
    with torch.inference_mode():
        compiled(*routed(router, 1, 2))
        x, weights, ids = routed(router, 3, 2)
        for t in (x, weights, ids):
            torch._dynamo.mark_dynamic(t, 0, min=2, max=4096)
        compiled(x, weights, ids)
    assert len(graphs) == 2

    def targets(gm: torch.fx.GraphModule) -> set:
        out = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        for sub in gm.children():
            if isinstance(sub, torch.fx.GraphModule):
                out |= targets(sub)
        return out

    one, many = targets(graphs[0]), targets(graphs[1])
    assert torch.ops.higher_order.cond not in one and torch.ops.research_rt.moe_grouped.default not in one
    assert torch.ops.higher_order.cond in many and torch.ops.research_rt.moe_grouped.default in many
