"""The C++ `research_rt::rms_norm` and `research_rt::silu_mul` ops (kernels/csrc/rms_norm_silu.cpp)
against the PyTorch code they replace in eager CPU forwards (models/layers/norm.py, llama.py's MLP).

Tolerances: bfloat16 within one bfloat16 rounding (2^-7 relative to the larger value) and equal in at
least 99% of elements (both compute in float32 and round at the same points; only the order of the sum
of squares and the exp differ); float32 within 1e-5 relative / 1e-5 absolute.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from research_rt.kernels import rms_norm_op, silu_mul_op
from research_rt.models.layers.norm import RMSNorm
from research_rt.models.llama import DecoderMLP

rms_norm, silu_mul = rms_norm_op(), silu_mul_op()
pytestmark = pytest.mark.skipif(rms_norm is None, reason="the C++ extension did not build here")

# (rows, width): SmolLM2's hidden and MLP sizes, and ragged widths for the 16-wide loops' tails
SHAPES = [(512, 576), (3, 1536), (1, 33), (7, 100), (0, 64)]


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.bfloat16:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-6)
        if out.numel():
            assert (out != ref).float().mean().item() <= 0.01
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", SHAPES)
def test_rms_norm_matches_pytorch(dtype, rows, width):
    g = torch.Generator().manual_seed(rows * 7 + width)
    x = (3 * torch.randn(rows, width, generator=g)).to(dtype)
    w = torch.randn(width, generator=g).to(dtype)
    assert_matches(rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", SHAPES)
def test_silu_mul_matches_pytorch(dtype, rows, width):
    g = torch.Generator().manual_seed(rows * 11 + width)
    gate_up = (3 * torch.randn(rows, 2 * width, generator=g)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_matches(silu_mul(gate_up), F.silu(gate) * up)


def test_ops_take_any_leading_shape_and_reject_bad_input():
    x = torch.randn(2, 3, 64)
    w = torch.randn(64)
    assert_matches(rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6))
    assert silu_mul(x).shape == (2, 3, 32)
    with pytest.raises(RuntimeError, match="weight"):
        rms_norm(x, w.bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="contiguous"):
        rms_norm(x.transpose(0, 1), w, 1e-6)
    with pytest.raises(RuntimeError, match="halves"):
        silu_mul(torch.randn(2, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_use_the_ops_in_inference_and_agree_with_their_pytorch_code(dtype, monkeypatch):
    """Under inference mode RMSNorm and the MLP call the ops; with grad on (or the ops switched off)
    they run their PyTorch code; both give the same values."""
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5).to(dtype)
    norm.weight.data.normal_()
    mlp = DecoderMLP(96, 64).to(dtype)
    x = torch.randn(5, 96).to(dtype)
    calls: list[str] = []
    monkeypatch.setattr(
        "research_rt.models.layers.norm.rms_norm_op", lambda: lambda *a: calls.append("norm") or rms_norm(*a)
    )
    monkeypatch.setattr(
        "research_rt.models.layers.activation.silu_mul_op",
        lambda: lambda *a: calls.append("mlp") or silu_mul(*a),
    )
    with torch.inference_mode():
        fused = norm(x), mlp(x)
    assert calls == ["norm", "mlp"]
    plain = norm(x).detach(), mlp(x).detach()  # grad mode on
    assert calls == ["norm", "mlp"]  # grad on: the PyTorch code
    assert_matches(fused[0], plain[0])
    torch.testing.assert_close(fused[1].float(), plain[1].float(), rtol=2**-6, atol=1e-3)
