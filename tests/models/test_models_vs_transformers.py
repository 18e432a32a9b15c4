"""Every architecture against transformers on a tiny random checkpoint, through the whole runtime.

Tolerance (float32): prompt log-probabilities within 2e-4 (absolute) of transformers' log-softmax;
greedy continuations identical token for token.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_CONFIGS, eager_engine, hf_greedy, make_tiny_checkpoint

LOGPROB_ATOL = 2e-4
PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [300, 1, 2, 3], list(range(10, 60))]


def hf_reference(path, prompt: list[int], new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return logprobs, hf_greedy(model, prompt, new_tokens)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_architecture_matches_transformers(name, tmp_path):
    path = make_tiny_checkpoint(name, tmp_path / "ckpt")
    engine = eager_engine(str(path), dtype="float32", skip_tokenizer_init=True)
    try:
        for prompt in PROMPTS:
            ref_logprobs, ref_tokens = hf_reference(path, prompt, 12)
            out = engine.generate(
                input_ids=prompt,
                sampling_params={"temperature": 0, "max_new_tokens": 12, "ignore_eos": True},
                return_logprob=True,
                logprob_start_len=0,
            )
            assert out["output_ids"] == ref_tokens, f"{name}: greedy tokens differ"
            entries = out["meta_info"]["input_token_logprobs"]
            assert entries[0][0] is None and len(entries) == len(prompt)
            ours = torch.tensor([e[0] for e in entries[1:]])
            theirs = ref_logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
            torch.testing.assert_close(ours, theirs, atol=LOGPROB_ATOL, rtol=0)
            # output logprobs: each greedy token's log-probability under transformers' full distribution
            full = torch.tensor(prompt + ref_tokens)
            engine.check_pool_integrity()
        score = engine.generate(
            input_ids=full.tolist(),
            sampling_params={"max_new_tokens": 0},
            return_logprob=True,
            logprob_start_len=0,
        )
        assert score["meta_info"]["completion_tokens"] == 0
        assert len(score["meta_info"]["input_token_logprobs"]) == len(full)
    finally:
        engine.shutdown()


def test_unsupported_architecture_lists_supported(tmp_path):
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt")
    cfg = (path / "config.json").read_text().replace("LlamaForCausalLM", "FancyNewForCausalLM")
    (path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="Supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        eager_engine(str(path), dtype="float32", skip_tokenizer_init=True)


def test_unknown_model_path_names_it():
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        eager_engine("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="/does/not/exist"):
        eager_engine("/does/not/exist")
