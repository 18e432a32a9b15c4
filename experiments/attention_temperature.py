"""Experiment: a Llama variant whose attention logits are divided by a temperature tau.

Shows how a researcher swaps in a modified model without editing the package: subclass the
architecture, override one module, register it under the checkpoint's architecture name, and run it
through the same Engine (scheduler, radix cache, batching) as the stock model.

    .venv/bin/python -m experiments.attention_temperature --tau 1.5
"""

from __future__ import annotations

import argparse

from research_rt import Engine, register_model
from research_rt.models.llama import DecoderLayer, LlamaForCausalLM


def make_llama_with_attention_temperature(tau: float) -> type[LlamaForCausalLM]:
    class TemperedLayer(DecoderLayer):
        def __init__(self, config, layer_id, rotary, qkv_bias, qk_norm) -> None:
            super().__init__(config, layer_id, rotary, qkv_bias, qk_norm)
            self.self_attn.attn.scaling /= tau  # softmax(q.k / (sqrt(d) * tau))

    class TemperedLlama(LlamaForCausalLM):
        layer_cls = TemperedLayer

    return TemperedLlama


def run(tau: float, prompt: str, model_path: str | None = None, max_new_tokens: int = 32) -> str:
    register_model("LlamaForCausalLM", override=True)(make_llama_with_attention_temperature(tau))
    try:
        with Engine(model_path, dtype="float32") as engine:
            text = prompt
            if engine.tokenizer is not None and engine.tokenizer.chat_template:
                text = engine.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
            return engine.generate(text, {"temperature": 0, "max_new_tokens": max_new_tokens})["text"]
    finally:
        register_model("LlamaForCausalLM", override=True)(LlamaForCausalLM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tau", type=float, default=1.5)
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--model-path", default=None)
    args = parser.parse_args()
    for tau in (1.0, args.tau):
        print(f"tau={tau}: {run(tau, args.prompt, args.model_path)!r}")


if __name__ == "__main__":
    main()
