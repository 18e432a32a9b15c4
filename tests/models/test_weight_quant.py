"""Weight-only quantization (`--torchao-config`): the packed kernels multiply by exactly the
dequantized weights the dense path uses, and a Q4_1-style grid is reproduced, not re-rounded."""

from __future__ import annotations

import pytest
import torch

from research_rt.core.quant_config import WeightOnlyConfig
from research_rt.models.layers.linear import Linear, linear, pack_linear_weights
from research_rt.models.layers.packed_weight import quantize_weight
from research_rt.models.layers.quant import quantize_model
from research_rt.server_args import ServerArgs


def test_parse_specs():
    assert WeightOnlyConfig.parse("") is None
    assert WeightOnlyConfig.parse("int8wo") == WeightOnlyConfig(8, 0)
    assert WeightOnlyConfig.parse("int4wo-32") == WeightOnlyConfig(4, 32)
    for bad in ("int4wo", "int4wo-7", "fp8wo", "int8"):
        with pytest.raises(ValueError, match="torchao_config must be one of"):
            WeightOnlyConfig.parse(bad)
    with pytest.raises(ValueError, match="torchao_config"):
        ServerArgs(torchao_config="int2wo")


@pytest.mark.parametrize("spec", ["int8wo", "int4wo-32", "int4wo-128"])
def test_packed_matmul_equals_dequantized_weights(spec):
    torch.manual_seed(0)
    w = torch.randn(192, 256).to(torch.bfloat16)
    packed, deq = quantize_weight(w, WeightOnlyConfig.parse(spec))
    # the quantization error is bounded by half a step of each row / group
    step = (w.float().abs().amax(1, keepdim=True) / 127) if spec == "int8wo" else None
    err = (deq - w.float()).abs()
    if step is not None:
        assert (err <= step * 0.75 + 1e-3).all()  # half a step, plus the bfloat16 scale rounding
    else:
        gs = packed.group_size
        blocks = w.float().view(192, -1, gs)
        half_step = ((blocks.amax(-1) - blocks.amin(-1)) / 30).repeat_interleave(gs, 1)
        assert (err <= half_step + 2e-2).all()
    x = torch.randn(1, 256).to(torch.bfloat16)
    want = x.float() @ deq.T
    got = packed.matmul(x).float()
    assert torch.allclose(got, want, rtol=1e-2, atol=0.15), (got - want).abs().max()


def test_int4_reproduces_a_q4_1_grid():
    """Blocks of 32 as a Q4_1 file stores them (d * q + m, q in 0..15, both ends used): int4wo-32
    finds the same codes, so dequantized == original up to bfloat16 rounding."""
    torch.manual_seed(1)
    d = torch.rand(64, 8, 1) * 0.1 + 0.01
    m = -(6 + 3 * torch.rand(64, 8, 1)) * d  # a zero point inside the range, as real weights have
    q = torch.randint(0, 16, (64, 8, 32))
    q[..., 0], q[..., 1] = 0, 15
    w = (d * q + m).view(64, 256).to(torch.bfloat16)
    deq = quantize_weight(w, WeightOnlyConfig(4, 32))[1].to(torch.bfloat16)
    # two bfloat16 steps at the block's magnitude (scale and zero are stored in bfloat16); a
    # different grid would be off by up to half a 4-bit step, d / 2, over twice that
    block_ulp = (w.float().abs().view(64, 8, 32).amax(-1, keepdim=True) * 2**-6).expand(-1, -1, 32)
    assert ((deq.float() - w.float()).abs() <= block_ulp.reshape(64, 256)).all()
    assert (d / 2 > 2 * block_ulp[..., :1]).all()


def test_quantize_model_one_row_and_many_rows_agree():
    """A row alone and the same row inside a batch give the same result: bit for bit where int4 runs
    `research_rt::q4_linear` (every row count), else up to summation order (ATen's kernel for a row
    alone, the dense product over the dequantized weights for a batch): quantization changes the
    model once."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(Linear(128, 96, bias=True), Linear(96, 64)).to(torch.bfloat16)
    original = model[0].weight.detach().clone()
    assert quantize_model(model, WeightOnlyConfig(4, 32)) == 2
    assert model[0].packed is not None and not torch.equal(model[0].weight, original)
    x = torch.randn(8, 128).to(torch.bfloat16)
    batched = model(x)
    alone = torch.cat([model(x[i : i + 1]) for i in range(8)])
    assert torch.allclose(alone.float(), batched.float(), rtol=2e-2, atol=2e-2)
    if model[0].packed.any_rows:  # q4_linear (AVX512-BF16) serves the batch too
        assert torch.equal(alone, batched)
    # requantizing (after a weight update) refills the same packed tensors
    qweight = model[0].packed.qweight
    quantize_model(model, WeightOnlyConfig(4, 32))
    assert model[0].packed.qweight is qweight
    # unpacked linears are untouched by the one-row rule
    plain = torch.nn.Linear(16, 8)
    assert torch.allclose(linear(torch.ones(1, 16), plain.weight, plain.bias), plain(torch.ones(1, 16)))


def test_dense_path_multiplies_by_the_dequantized_weights_after_load():
    """The loader packs the gemv op's copy of each weight before quantization replaces the weights
    with their dequantized values; batches (and prefill) must then multiply by the new values, not
    the stale copy (before: off by up to 0.11 on this layer)."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(Linear(256, 96, bias=False)).to(torch.bfloat16)
    pack_linear_weights(model)  # as the loader does after loading
    quantize_model(model, WeightOnlyConfig(4, 32))
    x = torch.randn(8, 256).to(torch.bfloat16)
    want = x.float() @ model[0].weight.float().T
    with torch.inference_mode():
        got = model(x).float()
    assert ((got - want).abs() <= want.abs() * 2**-7 + 1e-2).all(), (got - want).abs().max()


def test_float32_models_are_refused():
    with pytest.raises(ValueError, match="bfloat16/float16"):
        quantize_weight(torch.randn(8, 32), WeightOnlyConfig(8, 0))
