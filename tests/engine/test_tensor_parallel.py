"""--tp-size 2 (two gloo ranks on CPU) gives the greedy tokens of tp 1, and leaves no process."""

from __future__ import annotations

import psutil
import pytest
import torch

import research_rt
from tests.conftest import make_tiny_checkpoint

PROMPTS = [[3, 4, 5, 6, 7], [9, 10, 11], [20, 21, 22, 23, 24, 25, 26]]
PARAMS = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}


def greedy(path, tp: int, **kw) -> tuple[list[list[int]], list[int]]:
    kw = {"dtype": "float32", "random_seed": 0, "skip_tokenizer_init": True, "max_total_tokens": 2048, **kw}
    kw.setdefault("disable_torch_compile", not kw.get("enable_torch_compile"))  # eager unless asked
    engine = research_rt.Engine(str(path), tp_size=tp, **kw)
    try:
        pids = engine.runner.rank_pids() if tp > 1 else []
        outs = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS)
        engine.check_pool_integrity()
    finally:
        engine.shutdown()
    return [o["output_ids"] for o in outs], pids


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM"])
def test_tp2_greedy_matches_tp1(tmp_path, arch):
    # an odd vocabulary: the vocab-parallel embedding and head pad it to a multiple of 2
    path = make_tiny_checkpoint(arch, tmp_path / arch, vocab_size=511)
    want, _ = greedy(path, 1)
    got, pids = greedy(path, 2)
    assert got == want
    assert len(pids) == 1
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_tp2_compiled_decode_matches_tp1(tmp_path):
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "llama", vocab_size=511)
    want, _ = greedy(path, 1)
    got, _ = greedy(path, 2, enable_torch_compile=True, torch_compile_max_bs=4)
    assert got == want


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL path: needs 2 CUDA devices")
def test_tp2_nccl_matches_tp1(tmp_path):
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "llama", vocab_size=511)
    want, _ = greedy(path, 1, device="cuda")
    got, _ = greedy(path, 2, device="cuda")
    assert got == want


def test_tp_size_not_dividing_heads_is_refused(tmp_path):
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "llama", vocab_size=64)
    with pytest.raises(ValueError, match="attention heads"):
        greedy(path, 3)
