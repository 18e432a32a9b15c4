"""The compiled decode step: bucket choice, padding, compiled-vs-eager invariance; CUDA graph capture."""

from __future__ import annotations

import pytest
import torch

import research_rt
from research_rt.core.forward_batch import ForwardBatch, ForwardMode
from research_rt.executor.attention.torch_native import (
    TorchNativeAttnBackend,
    TorchNativeMetadata,
    build_attention_metadata,
)
from research_rt.executor.graph_runner import KV_ALIGN, batch_buckets, bucket_for, pad_decode_inputs


def test_buckets_cover_every_batch_size():
    for max_bs in (1, 3, 8, 32, 160):
        buckets = batch_buckets(max_bs)
        assert buckets == sorted(set(buckets)) and buckets[0] == 1 and buckets[-1] == max_bs
        for bs in range(1, max_bs + 1):
            b = bucket_for(bs, buckets)
            assert b is not None and b >= bs
            assert b - bs <= max(bs // 2, 8)  # bounded padding waste
        assert bucket_for(max_bs + 1, buckets) is None


def _decode_batch(seq_lens: list[int]) -> ForwardBatch:
    rows = torch.arange(1, 1 + 64 * len(seq_lens)).view(len(seq_lens), 64)
    kv, mask, _, _ = build_attention_metadata(
        ForwardMode.DECODE, [n - 1 for n in seq_lens], [1] * len(seq_lens), rows
    )
    bs = len(seq_lens)
    return ForwardBatch(
        ForwardMode.DECODE,
        bs,
        torch.arange(10, 10 + bs),
        torch.tensor([n - 1 for n in seq_lens]),
        torch.tensor([r[n - 1] for r, n in zip(rows.tolist(), seq_lens)]),
        TorchNativeMetadata(kv, mask),
        attn_backend=TorchNativeAttnBackend(),
    )


def test_padding_targets_the_dummy_slot_and_keeps_real_rows():
    batch = _decode_batch([5, 9, 3])
    padded = pad_decode_inputs(batch, bucket=4, kv_len=KV_ALIGN)
    assert padded["input_ids"].shape == (4,) and padded["kv_indices"].shape == (4, KV_ALIGN)
    assert torch.equal(padded["kv_indices"][:3, :9], batch.attn_metadata.kv_indices)
    assert int(padded["out_cache_loc"][3]) == 0 and int(padded["kv_indices"][3].abs().sum()) == 0
    mask = padded["attn_mask"]
    assert mask.shape == (4, 1, 1, KV_ALIGN)
    assert mask[3, 0, 0].tolist() == [True] + [False] * (KV_ALIGN - 1)  # padded row sees only slot 0
    assert mask[0, 0, 0, :5].all() and not mask[0, 0, 0, 5:].any()  # keys past a request's length hidden
    assert torch.equal(mask[:3, :, :, :9], batch.attn_metadata.attn_mask)


def test_compiled_decode_matches_eager(tiny_llama_dir):
    """Greedy tokens identical with the compiled step, for batches of 1 and 3 (padded to 4)."""
    prompts = [[5, 100, 7, 9, 2000], [40, 41, 42], list(range(300, 340))]
    params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    with research_rt.Engine(
        str(tiny_llama_dir), dtype="float32", disable_torch_compile=True, torch_compile_max_bs=4
    ) as eager:
        want = [o["output_ids"] for o in eager.generate(input_ids=prompts, sampling_params=params)]
        want_one = eager.generate(input_ids=prompts[0], sampling_params=params)["output_ids"]
    with research_rt.Engine(
        str(tiny_llama_dir),
        dtype="float32",
        enable_torch_compile=True,
        torch_compile_max_bs=4,
        disable_background_compile=True,
    ) as compiled:
        got_one = compiled.generate(input_ids=prompts[0], sampling_params=params)["output_ids"]
        got = [o["output_ids"] for o in compiled.generate(input_ids=prompts, sampling_params=params)]
        assert compiled.runner.graph_runner is not None and compiled.runner.graph_runner.seen_shapes
        compiled.check_pool_integrity()
    assert got_one == want_one
    assert got == want


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_matches_eager(tiny_llama_dir):
    prompts = [[5, 100, 7, 9, 2000], [40, 41, 42]]
    params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    with research_rt.Engine(
        str(tiny_llama_dir), dtype="float32", device="cuda", disable_cuda_graph=True
    ) as eager:
        want = [o["output_ids"] for o in eager.generate(input_ids=prompts, sampling_params=params)]
    with research_rt.Engine(
        str(tiny_llama_dir), dtype="float32", device="cuda", cuda_graph_max_bs=4
    ) as graphed:
        got = [o["output_ids"] for o in graphed.generate(input_ids=prompts, sampling_params=params)]
        assert graphed.runner.graph_runner.graphs  # captured
    assert got == want


class _ToyDecoder(torch.nn.Module):
    """The smallest model the decode step runs: it reads every layer's KV buffer, so each layer
    count is a distinct graph (a Python-level difference that no dynamic shape covers)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 4)

    def forward(self, input_ids, positions, batch):
        kv = sum(k[batch.out_cache_loc].sum(dim=(1, 2)) for k in batch.kv_pool.k_buffers)
        return self.emb(input_ids) + kv.unsqueeze(-1)

    def compute_logits(self, hidden):
        return hidden @ self.emb.weight.T


def test_many_runners_compile_in_a_thread():
    """Ten runners in one process, compiled on a thread as the background compile does: each keeps
    its own Dynamo entries, so none meets the shared recompile limit of 8 (CI once failed so:
    Dynamo's config is thread-local, and a limit raised on the main thread did not apply)."""
    import threading

    from research_rt.cache.kv_pool import KVPool
    from research_rt.executor.graph_runner import DecodeGraphRunner

    runners = [
        DecodeGraphRunner(
            _ToyDecoder(),
            KVPool(8, 1 + i, 1, 2, torch.float32, "cpu"),
            TorchNativeAttnBackend(),
            1,
            torch.device("cpu"),
            False,
        )
        for i in range(10)
    ]  # built here, compiled on another thread: as ModelRunner and warm_up_in_background do
    errors: list[BaseException] = []

    def compile_all() -> None:
        try:
            for runner in runners:
                runner.warm_up()
        except BaseException as e:  # noqa: BLE001 - reported to the test's thread
            errors.append(e)

    t = threading.Thread(target=compile_all)
    t.start()
    t.join()
    assert errors == []
    assert all(r.ready_families == {1, 2} for r in runners)


@pytest.mark.parametrize("seq_lens", [[5], [5, 9, 3]])
def test_compiled_step_sees_weights_edited_in_place(seq_lens):
    """The compiled step drops Dynamo's guards on the model's modules (GUARD_FILTER), not its view of
    the weights: an in-place edit (as weight updates make) shows in the next step's logits, for
    both shape families."""
    from research_rt.cache.kv_pool import KVPool
    from research_rt.executor.graph_runner import GUARD_FILTER, DecodeGraphRunner

    assert GUARD_FILTER is torch.compiler.skip_guard_on_all_nn_modules_unsafe
    model = _ToyDecoder()
    pool = KVPool(64 * len(seq_lens) + 1, 2, 1, 2, torch.float32, "cpu")
    for k in pool.k_buffers:
        k.zero_()
    runner = DecodeGraphRunner(model, pool, TorchNativeAttnBackend(), 4, torch.device("cpu"), False)
    runner.warm_up()
    batch = _decode_batch(seq_lens)
    ids = batch.input_ids
    with torch.no_grad():
        before = runner.run(batch)
        torch.testing.assert_close(before, model.emb.weight[ids] @ model.emb.weight.T)
        model.emb.weight.mul_(-2.0)
        after = runner.run(batch)
        torch.testing.assert_close(after, model.emb.weight[ids] @ model.emb.weight.T)
    assert not torch.allclose(before, after)
