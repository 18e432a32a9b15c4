"""GGUF loading: a tiny Llama written to GGUF (F32/F16/BF16/Q8_0/Q4_0/Q4_1, llama.cpp's q/k row
permutation) loads into research_rt and matches transformers loading the same file; and the real
SmolLM2-135M-Instruct matches transformers in float32 (greedy, 8 prompts x 32 tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import eager_engine, hf_greedy, make_tiny_checkpoint


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of what we undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_dir: Path, out: Path, qtype: str) -> Path:
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_dir)
    tensors = load_file(hf_dir / "model.safetensors")
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    qt = gguf.GGMLQuantizationType[qtype]
    for name, t in tensors.items():
        if name in names:
            gname = names[name]
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.weight"
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        if a.ndim == 2 and qtype != "F32":
            data = gguf.quants.quantize(a, qt)
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qt)
        else:
            w.add_tensor(gname, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_tiny_gguf_matches_transformers(qtype, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "hf", vocab_size=256)
    gguf_path = write_tiny_gguf(hf_dir, tmp_path / f"tiny-{qtype}.gguf", qtype)
    ref = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    with torch.no_grad():
        ref_lp = torch.log_softmax(ref(torch.tensor([prompt])).logits[0], -1)
    ref_out = hf_greedy(ref, prompt, 10)
    engine = eager_engine(str(gguf_path), dtype="float32", skip_tokenizer_init=True)
    try:
        out = engine.generate(
            input_ids=prompt,
            sampling_params={"temperature": 0, "max_new_tokens": 10, "ignore_eos": True},
            return_logprob=True,
            logprob_start_len=0,
        )
    finally:
        engine.shutdown()
    assert out["output_ids"] == ref_out
    ours = torch.tensor([e[0] for e in out["meta_info"]["input_token_logprobs"][1:]])
    theirs = ref_lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


SMOL_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child.",
    "List three prime numbers.",
    "Translate 'good morning' into French.",
    "What is 12 times 7?",
    "Give me a tip for learning Python.",
    "Who wrote Romeo and Juliet?",
]


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm_gguf_path, smollm_compiled_engine):
    """In the default configuration: the decode step compiled, in a batch and for one request alone."""
    from transformers import AutoModelForCausalLM

    p = Path(smollm_gguf_path)
    engine = smollm_compiled_engine
    engine.flush_cache()
    tok = engine.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in SMOL_PROMPTS
    ]
    outs = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True})
    engine.check_pool_integrity()
    # one request alone decodes through the batch-1 graph (its linears: the C++ gemv op)
    alone = [
        engine.generate(p, {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}) for p in prompts[:2]
    ]
    engine.check_pool_integrity()
    ref = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        expected = hf_greedy(ref, tok.encode(prompt), 32)
        assert out["output_ids"] == expected, prompt
        if i < len(alone):
            assert alone[i]["output_ids"] == expected, prompt
    assert "Paris" in outs[0]["text"]


@pytest.mark.slow
def test_smollm2_int4wo_keeps_the_q4_1_grid():
    """`--torchao-config int4wo-32` on the embedded Q4_1 model finds the file's own 4-bit codes: the
    dense weights stay within two bfloat16 steps of the plain bfloat16 load, prompt log-probs agree,
    and the batch-1 decode through the int4 kernel still answers."""
    from research_rt.models.layers.linear import Linear

    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    params = {"temperature": 0, "max_new_tokens": 12}
    outs, weights = [], []
    for quant in ("", "int4wo-32"):
        with eager_engine(dtype="bfloat16", torchao_config=quant) as engine:
            outs.append(engine.generate(prompt, params, return_logprob=True, logprob_start_len=0))
            engine.check_pool_integrity()
            layer = engine.runner.model.model.layers[3]
            weights.append(
                {n: m.weight.detach().clone() for n, m in layer.named_modules() if isinstance(m, Linear)}
            )
            assert (layer.mlp.down_proj.packed is not None) == bool(quant)
    for name, plain in weights[0].items():
        blocks = plain.float().view(plain.shape[0], -1, 32)
        two_steps = (blocks.abs().amax(-1, keepdim=True) * 2**-6).expand_as(blocks).reshape(plain.shape)
        assert ((weights[1][name].float() - plain.float()).abs() <= two_steps).all(), name
    plain_lp = [lp for lp, *_ in outs[0]["meta_info"]["input_token_logprobs"][1:]]
    quant_lp = [lp for lp, *_ in outs[1]["meta_info"]["input_token_logprobs"][1:]]
    # measured 0.06 on an AVX-512/AVX512_BF16 host, 0.137 on an AVX2-only one (bfloat16 GEMMs differ)
    assert max(abs(a - b) for a, b in zip(plain_lp, quant_lp)) < 0.25
    assert "Paris" in outs[1]["text"]
