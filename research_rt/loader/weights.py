"""Iterate a checkpoint's tensors under Hugging Face names: safetensors (single or sharded) and GGUF."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp's converter permutes q/k rows of these architectures for its rope layout.
_GGUF_PERMUTED_ARCHS = ("llama", "mistral")


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {directory}")
    return files


def iterate_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in safetensors_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def count_safetensors(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in safetensors_files(directory):
        with safe_open(str(file), framework="pt") as f:
            total += len(list(f.keys()))
    return total


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".")
    if parts[0] != "blk" or len(parts) != 4:
        return None
    hf = _GGUF_LAYER_NAMES.get(parts[2])
    return None if hf is None else f"model.layers.{parts[1]}.{hf}.{parts[3]}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def iterate_gguf(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize every tensor (F32, F16, BF16, Q8_0, Q4_0, Q4_1, ... as `gguf` supports) to float32."""
    import gguf

    reader = gguf.GGUFReader(str(file))
    arch = str(reader.fields["general.architecture"].contents())
    n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    n_kv = int(kv_field.contents()) if kv_field is not None else n_head
    for t in reader.tensors:
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            continue
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        data = np.asarray(data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        if arch in _GGUF_PERMUTED_ARCHS and hf.endswith(("q_proj.weight", "k_proj.weight")):
            data = _unpermute(data, n_head if "q_proj" in hf else n_kv)
        yield hf, torch.from_numpy(np.array(data, copy=True))  # writable, contiguous
