"""A researcher's own model class, registered from outside the package, runs through the Engine."""

from __future__ import annotations

from experiments.attention_temperature import run


def test_registered_variant_runs_and_changes_output(tiny_llama_dir):
    prompt = "The quick brown fox jumps over the lazy dog"
    stock = run(1.0, prompt, str(tiny_llama_dir), max_new_tokens=16)
    again = run(1.0, prompt, str(tiny_llama_dir), max_new_tokens=16)
    tempered = run(4.0, prompt, str(tiny_llama_dir), max_new_tokens=16)
    assert stock == again
    assert tempered != stock  # the override really ran


def test_registry_restored_after_experiment():
    from research_rt.models.llama import LlamaForCausalLM
    from research_rt.models.registry import resolve_model_class

    assert resolve_model_class(["LlamaForCausalLM"]) is LlamaForCausalLM
