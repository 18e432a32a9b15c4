"""Qwen2-MoE: the Qwen2 decoder (qkv bias) whose MLPs are sparse MoE blocks with a shared expert.

Layer `i` is sparse unless it is in `mlp_only_layers` or `(i + 1) % decoder_sparse_step != 0`.
Routing: softmax, top-k, renormalized when `norm_topk_prob`. The shared expert's output is
scaled by `sigmoid(shared_expert_gate(x))`. `MoEDecoderLayer` and `MoEWeightsMixin` are shared
with mixtral.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from research_rt.core.forward_batch import ForwardBatch
from research_rt.models.layers.moe import SparseMoeBlock, parse_expert_name
from research_rt.models.llama import DecoderLayer, DecoderMLP, LlamaForCausalLM
from research_rt.models.registry import register_model


class MoEDecoderLayer(DecoderLayer):
    """A decoder layer whose MLP may be a SparseMoeBlock (it then gets the batch's recorder)."""

    def mlp_block(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoeBlock):
            return self.mlp(h, batch.expert_recorder)
        return self.mlp(h, batch)


class MoEWeightsMixin:
    """Per-expert HF tensors (`experts.<e>.{gate,up,down}_proj` or `w1/w3/w2`) into fused storage."""

    checkpoint_aliases: tuple[tuple[str, str], ...] = ()  # (checkpoint substring, module substring)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, SparseMoeBlock)]

    @property
    def num_experts(self) -> int:
        return self.model.layers[self.moe_layer_ids[0]].mlp.experts.num_experts

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()

        def dense(items: Iterable[tuple[str, torch.Tensor]]):
            for name, tensor in items:
                for old, new in self.checkpoint_aliases:
                    name = name.replace(old, new)
                parsed = parse_expert_name(name)
                if parsed is None:
                    yield name, tensor
                    continue
                prefix, expert, kind = parsed
                self.get_submodule(prefix).load_expert_weight(expert, kind, tensor)
                loaded.add(f"{prefix}#{expert}{kind}")

        return super().load_weights(dense(weights)) | loaded  # type: ignore[misc]

    def expected_weights(self) -> set[str]:
        names = set()
        for name in super().expected_weights():  # type: ignore[misc]
            if name.endswith(".experts.w13") or name.endswith(".experts.w2"):
                prefix = name.rsplit(".", 1)[0]
                experts = self.get_submodule(prefix).num_experts
                kinds = ("gate", "up") if name.endswith("w13") else ("down",)
                names |= {f"{prefix}#{e}{k}" for e in range(experts) for k in kinds}
            else:
                names.add(name)
        return names


class Qwen2MoeDecoderLayer(MoEDecoderLayer):
    def build_mlp(self, config, layer_id: int) -> nn.Module:
        sparse = layer_id not in (getattr(config, "mlp_only_layers", None) or []) and (
            config.num_experts > 0 and (layer_id + 1) % config.decoder_sparse_step == 0
        )
        if not sparse:
            return DecoderMLP(config.hidden_size, config.intermediate_size, layer_id=layer_id)
        shared_size = getattr(config, "shared_expert_intermediate_size", 0)
        return SparseMoeBlock(
            layer_id,
            config.hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.moe_intermediate_size,
            renormalize=bool(config.norm_topk_prob),
            shared_expert=DecoderMLP(config.hidden_size, shared_size) if shared_size else None,
        )


@register_model("Qwen2MoeForCausalLM")
class Qwen2MoeForCausalLM(MoEWeightsMixin, LlamaForCausalLM):
    qkv_bias = True
    layer_cls = Qwen2MoeDecoderLayer
