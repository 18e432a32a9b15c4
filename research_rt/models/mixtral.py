"""Mixtral: the Mistral decoder whose MLPs are sparse MoE blocks (top-k renormalized, no shared
expert). Checkpoints name the block `block_sparse_moe` and the experts' projections w1 (gate),
w3 (up), w2 (down); they load into the fused `mlp.experts` storage."""

from __future__ import annotations

from torch import nn

from research_rt.models.layers.moe import SparseMoeBlock
from research_rt.models.llama import LlamaForCausalLM
from research_rt.models.qwen2_moe import MoEDecoderLayer, MoEWeightsMixin
from research_rt.models.registry import register_model


class MixtralDecoderLayer(MoEDecoderLayer):
    def build_mlp(self, config, layer_id: int) -> nn.Module:
        return SparseMoeBlock(
            layer_id,
            config.hidden_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            config.intermediate_size,
            renormalize=True,
        )


@register_model("MixtralForCausalLM")
class MixtralForCausalLM(MoEWeightsMixin, LlamaForCausalLM):
    layer_cls = MixtralDecoderLayer
    checkpoint_aliases = ((".block_sparse_moe.", ".mlp."),)
