"""The C++ `research_rt::rotary` op (kernels/csrc/rotary.cpp) against the PyTorch code it replaces in
eager CPU forwards (models/layers/rotary.py): equal bit for bit in float32 and bfloat16, since both
round each product and the sum to the tensors' dtype at the same points."""

from __future__ import annotations

import pytest
import torch

from research_rt.kernels import rotary_op
from research_rt.models.layers import rotary as rotary_module
from research_rt.models.layers.rotary import RotaryEmbedding

rotary = rotary_op()
pytestmark = pytest.mark.skipif(rotary is None, reason="the C++ extension did not build here")


class RopeConfig:
    rope_theta = 10000.0
    rope_scaling = None


def pytorch_rotary(table: RotaryEmbedding, positions, q, k):
    """The module's PyTorch code (what compiled graphs and grad-enabled calls run)."""
    with torch.enable_grad():
        return table(positions, q, k)


# (tokens, head size): SmolLM2's chunk and decode shapes, a 128 head, and head sizes whose halves are
# not a multiple of 16 (the scalar loop)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,head_dim", [(512, 64), (1, 64), (7, 128), (5, 6), (3, 40), (0, 64)])
def test_rotary_equals_the_pytorch_code_on_views_of_a_fused_qkv_row(dtype, tokens, head_dim):
    g = torch.Generator().manual_seed(tokens * 13 + head_dim)
    table = RotaryEmbedding(RopeConfig(), head_dim, 4096)
    qkv = (3 * torch.randn(tokens, 15 * head_dim, generator=g)).to(dtype)
    q = qkv[:, : 9 * head_dim].view(tokens, 9, head_dim)  # strided views, as the model passes them
    k = qkv[:, 9 * head_dim : 12 * head_dim].view(tokens, 3, head_dim)
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    out_q, out_k = rotary(positions, q, k, table.cos, table.sin)
    ref_q, ref_k = pytorch_rotary(table, positions, q, k)
    assert out_q.dtype == dtype and out_q.is_contiguous() and out_k.is_contiguous()
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


def test_rotary_rounds_nan_and_denormal_products_as_pytorch_does():
    table = RotaryEmbedding(RopeConfig(), 64, 64)
    q = torch.randn(4, 2, 64)
    q[0, 0, 3] = float("nan")
    q[1, 1, 40] = 1e-39  # a float32 denormal: products round to bfloat16 denormals or zero
    q[2] = 1e-38
    q = q.bfloat16()
    k = q[:, :1].clone()
    positions = torch.tensor([0, 5, 17, 63])
    out, ref = rotary(positions, q, k, table.cos, table.sin), pytorch_rotary(table, positions, q, k)
    for a, b in zip(out, ref):  # NaN where PyTorch has NaN (its payload may differ), else the same bits
        assert torch.equal(a.isnan(), b.isnan()) and a.isnan().sum() == 2
        assert torch.equal(a[~a.isnan()].view(torch.int16), b[~b.isnan()].view(torch.int16))
        assert (a[1:2] != 0).any() and a.abs()[2].max() < 1e-37  # the tiny rows went through


def test_rotary_rejects_bad_input():
    table = RotaryEmbedding(RopeConfig(), 64, 16)
    q, k = torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    with pytest.raises(RuntimeError, match="position 16 outside"):
        rotary(torch.tensor([0, 16]), q, k, table.cos, table.sin)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        rotary(torch.tensor([0, 1]), q, k.bfloat16(), table.cos, table.sin)
    with pytest.raises(RuntimeError, match="one position per token"):
        rotary(torch.tensor([0]), q, k, table.cos, table.sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layer_uses_the_op_in_eager_inference_only(dtype, monkeypatch):
    """Under inference mode RotaryEmbedding calls the op; with grad on it runs its PyTorch code."""
    calls = []

    def counting_op():
        calls.append(1)
        return rotary

    monkeypatch.setattr(rotary_module, "rotary_op", counting_op)
    table = RotaryEmbedding(RopeConfig(), 64, 128)
    q, k = torch.randn(5, 9, 64).to(dtype), torch.randn(5, 3, 64).to(dtype)
    positions = torch.arange(3, 8)
    with torch.inference_mode():
        fast = table(positions, q, k)
    assert len(calls) == 1
    slow = pytorch_rotary(table, positions, q, k)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
