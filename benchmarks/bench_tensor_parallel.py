"""tp 1 vs tp 2 single-stream decode on a random-weight checkpoint of SmolLM2-135M's shape
(8 heads instead of 9 so that 2 ranks divide them)."""

import os
import sys
import time
from pathlib import Path

import torch

import research_rt

if __name__ == "__main__":
    d = Path(os.environ.get("BENCH_TP_DIR", "/tmp/research_rt_tp_bench"))
    if not d.exists():
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(
            "llama",
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            vocab_size=49152,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
        )
        cfg.architectures = ["LlamaForCausalLM"]
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(d)
    for tp in map(int, sys.argv[1:]):
        e = research_rt.Engine(
            str(d),
            tp_size=tp,
            random_seed=0,
            max_total_tokens=4096,
            skip_tokenizer_init=True,
            disable_background_compile=True,
        )
        p = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
        e.generate(input_ids=[1, 2, 3], sampling_params=p)
        p["max_new_tokens"] = 64
        t = time.perf_counter()
        out = e.generate(input_ids=[5, 6, 7, 8], sampling_params=p)
        dt = time.perf_counter() - t
        print(
            f"tp={tp} compile={e.server_args.enable_torch_compile} dtype={e.runner.dtype} tok/s={64 / dt:.1f} ids={out['output_ids'][:6]}",
            flush=True,
        )
        e.shutdown()
