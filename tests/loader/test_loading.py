"""Model paths and load formats: hub ids from the local cache, dtypes, dummy weights, clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from research_rt.loader.resolve import ModelNotFoundError, resolve_model_path
from tests.conftest import eager_engine, make_tiny_checkpoint


def test_hub_repo_id_resolves_from_local_cache(tmp_path, monkeypatch):
    """A repo id is found in the Hugging Face cache layout (refs/main -> snapshots/<rev>), offline."""
    ckpt = make_tiny_checkpoint("Qwen2ForCausalLM", tmp_path / "src")
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-qwen2"
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(ckpt, repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    source = resolve_model_path("tiny-org/tiny-qwen2")
    assert source.directory == repo / "snapshots" / rev and not source.is_gguf
    with eager_engine("tiny-org/tiny-qwen2", dtype="float32", skip_tokenizer_init=True) as engine:
        out = engine.generate(input_ids=[1, 2, 3], sampling_params={"temperature": 0, "max_new_tokens": 3})
        assert out["meta_info"]["completion_tokens"] == 3
    with pytest.raises(ModelNotFoundError, match=r"tiny-org/missing \(repository not found\)"):
        resolve_model_path("tiny-org/missing")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes_match_transformers(tmp_path, dtype):
    """Half-precision prompt logprobs stay within 0.1 of transformers run in the same dtype."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt")
    prompt = list(range(5, 40))
    with eager_engine(str(path), dtype=dtype, skip_tokenizer_init=True) as engine:
        assert engine.runner.dtype == getattr(torch, dtype)
        assert engine.runner.kv_pool.k_buffers[0].dtype == getattr(torch, dtype)
        out = engine.generate(
            input_ids=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0
        )
    ours = torch.tensor([e[0] for e in out["meta_info"]["input_token_logprobs"][1:]])
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
    theirs = lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert (ours - theirs).abs().max() < 0.1, (ours - theirs).abs().max()


def test_dummy_load_format_needs_no_weights(tmp_path):
    path = make_tiny_checkpoint("Qwen3ForCausalLM", tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    with eager_engine(str(path), dtype="float32", load_format="dummy", skip_tokenizer_init=True) as engine:
        out = engine.generate(input_ids=[4, 5, 6], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
        assert len(out["output_ids"]) == 4
    with pytest.raises(FileNotFoundError):
        eager_engine(str(path), dtype="float32", skip_tokenizer_init=True)


def test_missing_weights_are_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks weights for: model.layers.1.mlp.gate_up_proj.weight#1"):
        eager_engine(str(path), dtype="float32", skip_tokenizer_init=True)


def test_sharded_safetensors_with_index(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    path = make_tiny_checkpoint("MistralForCausalLM", tmp_path / "ckpt")
    with eager_engine(str(path), dtype="float32", skip_tokenizer_init=True) as engine:
        want = engine.generate(input_ids=[7, 8, 9], sampling_params={"temperature": 0, "max_new_tokens": 5})
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, path / file)
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with eager_engine(str(path), dtype="float32", skip_tokenizer_init=True) as engine:
        got = engine.generate(input_ids=[7, 8, 9], sampling_params={"temperature": 0, "max_new_tokens": 5})
    assert got["output_ids"] == want["output_ids"]


def test_context_length_beyond_the_model_is_refused(tmp_path):
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt")  # 512 positions
    with pytest.raises(
        ValueError, match=r"context_length \(1024\) is greater than the derived context_length \(512\)"
    ):
        eager_engine(str(path), dtype="float32", skip_tokenizer_init=True, context_length=1024)
    with eager_engine(str(path), dtype="float32", skip_tokenizer_init=True, context_length=256) as engine:
        assert engine.context_len == 256
