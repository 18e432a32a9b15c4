"""Shared fixtures: tiny random-weight checkpoints (built from transformers configs) and the real model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)

TINY_CONFIGS = {
    "LlamaForCausalLM": dict(model_type="llama", tie_word_embeddings=False),
    "LlamaForCausalLM-tied-llama3": dict(
        model_type="llama",
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "MistralForCausalLM": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=None),
    "Qwen2ForCausalLM": dict(model_type="qwen2", tie_word_embeddings=False),
    "Qwen3ForCausalLM": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=32),
    "Qwen2MoeForCausalLM": dict(
        model_type="qwen2_moe",
        tie_word_embeddings=False,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        norm_topk_prob=False,
    ),
    "Qwen2MoeForCausalLM-normtopk-dense1": dict(
        model_type="qwen2_moe",
        tie_word_embeddings=False,
        num_experts=6,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
    "MixtralForCausalLM": dict(
        model_type="mixtral", tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2
    ),
}


def make_tiny_checkpoint(
    name: str, path: Path, vocab_size: int = 512, seed: int = 0, tokenizer_dir: Path | None = None
) -> Path:
    """Save a random-weight `transformers` model of architecture `name` (a TINY_CONFIGS key) to `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[name])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, **TINY_COMMON, **spec
    )
    config.architectures = [name.split("-")[0]]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init has tiny norms; widen weights so logits are not all ties
        for p in model.parameters():
            if p.dim() >= 1:
                p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, path / f.name)
    return path


def eager_engine(*args, **kwargs):
    """An Engine with torch.compile off, for tests of behaviour the compiled decode step does not
    change (eager keeps them fast: a background compile per Engine would cost the suite minutes).
    The default configuration, compile on, has tests of its own: tests/engine/test_invariance.py,
    the real model in tests/loader/test_gguf.py and tests/server/test_default_config.py."""
    import research_rt

    return research_rt.Engine(*args, disable_torch_compile=True, **kwargs)


def compiled_engine(*args, **kwargs):
    """The default configuration (compile on), compiled before the constructor returns rather than in
    the background, so that every decode batch the test sends runs the compiled step."""
    import research_rt

    return research_rt.Engine(*args, disable_background_compile=True, **kwargs)


@pytest.fixture(scope="session")
def smollm_gguf_path() -> str:
    from research_rt.loader.resolve import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm_compiled_engine():
    """The real model in float32 with compile on (compiled once for the session: about a minute a
    shape family on 2 cores), shared by the real-model correctness tests; each flushes the cache
    and checks the pool."""
    with compiled_engine(dtype="float32", random_seed=0) as engine:
        assert engine.compiled_decode() == ["1", "2+"]
        yield engine


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory, smollm_gguf_path) -> Path:
    """The SmolLM2 tokenizer (with chat template) saved as a plain HF tokenizer directory."""
    from transformers import AutoTokenizer

    p = Path(smollm_gguf_path)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    out = tmp_path_factory.mktemp("smollm_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and vocabulary (text in, text out, fast)."""
    out = tmp_path_factory.mktemp("tiny_llama")
    return make_tiny_checkpoint("LlamaForCausalLM", out, vocab_size=49152, tokenizer_dir=smollm_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama_dir):
    """A float32 eager Engine on the tiny Llama, shared by engine tests (pool checked by each test)."""
    engine = eager_engine(str(tiny_llama_dir), dtype="float32", random_seed=0)
    yield engine
    engine.shutdown()


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers greedy continuation that, like `ignore_eos`, neither stops at nor suppresses EOS."""
    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(new_tokens):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = model(torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return out
