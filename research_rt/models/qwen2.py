"""Qwen2: the Llama decoder with a bias on the fused qkv projection."""

from __future__ import annotations

from research_rt.models.llama import LlamaForCausalLM
from research_rt.models.registry import register_model


@register_model("Qwen2ForCausalLM")
class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
