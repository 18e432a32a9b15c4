"""Llama-family decoder (Llama 2/3, SmolLM, Mistral) as plain PyTorch modules.

Weights are fused: `qkv_proj` holds q, k and v stacked on the output dimension, `gate_up_proj`
holds gate and up. Qwen2 (qkv bias) and Qwen3 (per-head q/k RMSNorm) reuse these classes with
their flags set; see qwen2.py and qwen3.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from research_rt.core.forward_batch import ForwardBatch
from research_rt.core.interventions import InterventionShape
from research_rt.models.layers import Attention, RMSNorm, RotaryEmbedding
from research_rt.models.layers.activation import silu_and_mul
from research_rt.models.layers.intervention import ablate_heads, ablate_neurons, intervene
from research_rt.models.layers.linear import Linear, linear
from research_rt.models.protocol import KVSpec
from research_rt.models.registry import register_model


class DecoderMLP(nn.Module):
    def __init__(
        self, hidden_size: int, intermediate_size: int, bias: bool = False, layer_id: int = -1
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        act = silu_and_mul(self.gate_up_proj(x))
        return self.down_proj(ablate_neurons(batch, self.layer_id, act))


class DecoderAttention(nn.Module):
    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=getattr(config, "o_proj_bias", False))
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary = [rotary]  # a list: shared, not registered as this module's child
        self.attn = Attention(layer_id, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary[0](positions, q, k)
        o = ablate_heads(batch, self.layer_id, self.attn(q, k, v, batch), self.num_heads)
        return self.o_proj(o)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config, layer_id, rotary, qkv_bias, qk_norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.build_mlp(config, layer_id)

    def build_mlp(self, config, layer_id: int) -> nn.Module:
        return DecoderMLP(
            config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False), layer_id
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # each `intervene` returns its input unless a request of the batch steers or captures there
        n = self.layer_id
        x = intervene(batch, n, "resid_pre", x)
        attn = intervene(batch, n, "attn_out", self.attn_block(positions, x, batch))
        x = intervene(batch, n, "resid_mid", x + attn)
        mlp = intervene(batch, n, "mlp_out", self.mlp_block(x, batch))
        return intervene(batch, n, "resid_post", x + mlp)

    def attn_block(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.self_attn(positions, self.input_layernorm(x), batch)

    def mlp_block(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(x), batch)


class DecoderModel(nn.Module):
    def __init__(self, config, layer_cls: type[DecoderLayer], qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary = RotaryEmbedding(config, head_dim, config.max_position_embeddings)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            layer_cls(config, i, self.rotary, qkv_bias, qk_norm) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, batch)
        return self.norm(x)


# Checkpoint name -> (fused parameter, shard). Shards "q"/"k"/"v" or an index into equal chunks.
STACKED_PARAMS = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)


class LlamaForCausalLM(nn.Module):
    """`forward(input_ids, positions, batch) -> hidden`; `compute_logits(hidden) -> float32 logits`."""

    qkv_bias = False
    qk_norm = False
    layer_cls: type[DecoderLayer] = DecoderLayer

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        qkv_bias = self.qkv_bias or getattr(config, "attention_bias", False)
        self.model = DecoderModel(config, self.layer_cls, qkv_bias, self.qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight).float()

    def logit_lens(self, hidden: torch.Tensor) -> torch.Tensor:
        """A layer's residual stream read as the output: through the final norm and the LM head."""
        return self.compute_logits(self.model.norm(hidden))

    def intervention_shape(self) -> InterventionShape:
        layers = self.model.layers
        return InterventionShape(
            num_layers=len(layers),
            hidden_size=self.config.hidden_size,
            num_heads=layers[0].self_attn.num_heads,
            intermediate_sizes=tuple(
                layer.mlp.intermediate_size if isinstance(layer.mlp, DecoderMLP) else 0 for layer in layers
            ),
            vocab_size=self.config.vocab_size,
        )

    def kv_spec(self) -> KVSpec:
        attn = self.model.layers[0].self_attn.attn
        return KVSpec(len(self.model.layers), attn.num_kv_heads, attn.head_dim)

    # ------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into the fused parameters; return names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            target, shard = name, None
            for fused, part, shard_id in STACKED_PARAMS:
                if part in name:
                    target, shard = name.replace(part, fused), shard_id
                    break
            if target not in params:
                if self.skip_unknown_weight(name):
                    continue
                raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            param = params[target]
            dst = param.data if shard is None else self._shard_view(target, param, shard)
            if dst.shape != tensor.shape:
                raise ValueError(
                    f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            loaded.add(target if shard is None else f"{target}#{shard}")
        return loaded

    def skip_unknown_weight(self, name: str) -> bool:
        return False

    def _shard_view(self, target: str, param: nn.Parameter, shard: str | int) -> torch.Tensor:
        if isinstance(shard, int):
            return param.data.chunk(2, dim=0)[shard]
        attn = self.get_submodule(target.rsplit(".qkv_proj.", 1)[0])
        q, kv = attn.q_size, attn.kv_size
        start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard]
        return param.data.narrow(0, start, size)

    def expected_weights(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            if ".qkv_proj." in name:
                names |= {f"{name}#q", f"{name}#k", f"{name}#v"}
            elif ".gate_up_proj." in name:
                names |= {f"{name}#0", f"{name}#1"}
            else:
                names.add(name)
        return names


@register_model("MistralForCausalLM")
class MistralForCausalLM(LlamaForCausalLM):
    pass


register_model("LlamaForCausalLM")(LlamaForCausalLM)
