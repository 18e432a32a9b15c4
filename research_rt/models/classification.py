"""Sequence-classification and reward heads on the decoders: the score of the last token.

`LlamaForSequenceClassification` / `Qwen2ForSequenceClassification` (transformers: a bias-free
`score` Linear to `num_labels`) and `Qwen2ForRewardModel` (Qwen2.5-Math-RM style:
`score = Linear(H, H) -> ReLU -> Linear(H, 1)`, with biases). They are served as embedding models:
the scheduler pools the last prompt token's final hidden state through `pool`, which returns the
raw scores (no normalization). transformers scores the rightmost non-pad token; the embedding
front strips trailing `pad_token_id`s (see `pad_token_id` below), which is the same because
attention is causal.
"""

from __future__ import annotations

import torch
from torch import nn

from research_rt.models.llama import LlamaForCausalLM
from research_rt.models.qwen2 import Qwen2ForCausalLM
from research_rt.models.registry import register_model


class ScoreHeadMixin:
    """Replaces the LM head by a score head; `compute_logits` and `pool` return the scores."""

    def __init__(self, config) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        self.lm_head = None
        self.pad_token_id = getattr(config, "pad_token_id", None)
        self.score = self.build_score(config)

    def build_score(self, config) -> nn.Module:
        return nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden).float()

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden)

    def skip_unknown_weight(self, name: str) -> bool:
        return name == "lm_head.weight"


@register_model("LlamaForSequenceClassification")
class LlamaForSequenceClassification(ScoreHeadMixin, LlamaForCausalLM):
    pass


@register_model("Qwen2ForSequenceClassification")
class Qwen2ForSequenceClassification(ScoreHeadMixin, Qwen2ForCausalLM):
    pass


@register_model("Qwen2ForRewardModel")
class Qwen2ForRewardModel(ScoreHeadMixin, Qwen2ForCausalLM):
    def build_score(self, config) -> nn.Module:
        hidden = config.hidden_size
        return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
