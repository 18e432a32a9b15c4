"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before the rotary embedding."""

from __future__ import annotations

from research_rt.models.llama import LlamaForCausalLM
from research_rt.models.registry import register_model


@register_model("Qwen3ForCausalLM")
class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
