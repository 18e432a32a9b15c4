"""The gemv op's bfloat16 kernel on AVX512-BF16 (research_rt/kernels/csrc/panel_linear.cpp): the
weight is packed once and its packed copy must follow the weight. Edited in place (the version
counter), written through `.data` (then `forget_packed_weights`), freed and its memory reused by
another weight: the op always computes with the weight as it is now, bit for bit what a fresh copy
of that weight gives. Rows beyond the 64 of a decode bucket keep batch 1's bits too."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from research_rt.kernels import (
    amx_linear_available,
    decode_attention_vectorized,
    forget_packed_weights,
    gemv_op,
    packed_weight_count,
)

op = gemv_op()
pytestmark = pytest.mark.skipif(
    op is None or amx_linear_available() or not decode_attention_vectorized(torch.bfloat16, 64),
    reason="the panel kernel runs bfloat16 on AVX512-BF16 CPUs without AMX",
)


def fresh(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The op on a new copy of w: packed from scratch."""
    return op(x, w.clone(), None if b is None else b.clone())


def weights(n: int = 96, k: int = 160, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()


def test_a_weight_is_packed_once():
    x, w = weights()
    before = packed_weight_count()
    first = op(x, w, None)
    assert packed_weight_count() == before + 1
    for rows in (1, 3, 4):
        op(x[:rows], w, None)
    assert packed_weight_count() == before + 1
    assert torch.equal(op(x, w, None), first)


def test_in_place_edits_are_followed():
    x, w = weights(seed=1)
    op(x, w, None)
    w.mul_(2)
    assert torch.equal(op(x, w, None), fresh(x, w))
    w[5].zero_()  # through a view: the version counter is shared
    out = op(x, w, None)
    assert torch.equal(out, fresh(x, w)) and not out[:, 5].any()
    w.narrow(1, 0, 3).fill_(1)
    assert torch.equal(op(x, w, None), fresh(x, w))


def test_writes_through_data_are_followed_after_forget():
    x, w = weights(seed=2)
    p = torch.nn.Parameter(w, requires_grad=False)
    op(x, p, None)
    _, other = weights(seed=3)
    p.data.copy_(other)  # no version bump: the loader's way, which calls forget_packed_weights
    forget_packed_weights()
    assert torch.equal(op(x, p, None), fresh(x, other))


def test_a_freed_weight_is_not_mistaken_for_a_new_one():
    """The copy is kept by the weight's data pointer; a new weight in the freed memory (same
    address, same shape, version 0) must be packed anew."""
    x, w = weights(seed=4)
    w.mul_(1)  # version 1, as the new weights' after their copy_: only the storage tells them apart
    op(x, w, None)
    address, shape = w.data_ptr(), w.shape
    del w
    gc.collect()
    reused = False
    for seed in range(5, 25):
        w = torch.empty(shape, dtype=torch.bfloat16)  # first, so that it may take the freed block
        w.copy_(weights(seed=seed)[1])
        reused |= w.data_ptr() == address
        assert torch.equal(op(x, w, None), fresh(x, w)), seed
        del w
    if not reused:
        pytest.skip("the allocator did not hand back the freed address")


@pytest.mark.parametrize("k,n", [(576, 960), (33, 65), (1, 5), (200, 129)])
def test_rows_keep_batch_1_bits_past_64(k, n):
    g = torch.Generator().manual_seed(k + n)
    x = torch.randn(150, k, generator=g).bfloat16()
    w, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    alone = torch.cat([op(x[i : i + 1], w, b) for i in range(150)])
    for lo, hi in ((0, 150), (7, 100), (64, 129)):
        assert torch.equal(op(x[lo:hi], w, b).view(torch.int16), alone[lo:hi].view(torch.int16)), (lo, hi)
    exact = x.double() @ w.double().t() + b.double()
    torch.testing.assert_close(alone.double(), exact, rtol=2**-8, atol=1e-3 * k**0.5)
    torch.testing.assert_close(alone.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2 * k**0.5)


def test_fma_tiles_keep_batch_1_bits_through_denormals_and_cancellation():
    """From 16 rows on, Intel CPUs (VDPBF16PS at about half the FMA rate) take tiles of FMAs that
    compute what VDPBF16PS computes (panel_linear.cpp), so a row's bits still do not depend on its
    batch: here with denormal inputs and products, exact cancellations and large magnitudes."""
    intel = "GenuineIntel" in open("/proc/cpuinfo").read()
    assert torch.ops.research_rt.panel_fma_tiles() == intel
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 71, generator=g) * 2.0 ** torch.randint(-40, 40, (40, 71), generator=g)
    x[1], x[2], x[3] = -x[0], 1e-39, 1e-20  # cancels row 0; a denormal row; denormal products
    w = torch.randn(50, 71, generator=g) * 2.0 ** torch.randint(-40, 40, (50, 71), generator=g)
    w[4] = 1e-39
    x, w, b = x.bfloat16(), w.bfloat16(), torch.randn(50, generator=g).bfloat16()
    alone = torch.cat([op(x[i : i + 1], w, b) for i in range(40)])
    for lo, hi in ((0, 40), (3, 20), (0, 16)):
        assert torch.equal(op(x[lo:hi], w, b).view(torch.int16), alone[lo:hi].view(torch.int16)), (lo, hi)


def test_loading_and_updating_pack_the_decode_weights(tiny_llama_dir):
    """The loader packs every weight a decode step multiplies by (each Linear, and the embedding
    where the LM head is tied to it) so the first request does not; an update packs them again."""
    from research_rt.loader.model_loader import copy_named_tensors, load_model
    from research_rt.loader.resolve import resolve_model_path
    from research_rt.models.layers.linear import Linear

    before = packed_weight_count()
    model = load_model(resolve_model_path(str(tiny_llama_dir)), "bfloat16", "cpu").model
    weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
    if model.lm_head is None:
        weights.append(model.model.embed_tokens.weight)
    assert packed_weight_count() - before == len(weights)
    x = torch.randn(3, weights[0].shape[1]).bfloat16()
    loaded = packed_weight_count()
    with torch.inference_mode():
        out = op(x, weights[0], None)
    assert packed_weight_count() == loaded
    name = next(n for n, p in model.named_parameters() if p is weights[0])
    copy_named_tensors(model, [(name, weights[0] * 2)], direct=True)
    assert packed_weight_count() - loaded == len(weights)
    with torch.inference_mode():
        assert torch.equal(op(x, weights[0], None), fresh(x, weights[0]))
        assert not torch.equal(op(x, weights[0], None), out)
