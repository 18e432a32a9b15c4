"""Build a model from a ModelSource: config, tokenizer, module in the target dtype, weights."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from research_rt.kernels import forget_packed_weights
from research_rt.loader import gguf_cache
from research_rt.loader.resolve import ModelSource
from research_rt.loader.weights import count_safetensors, iterate_gguf, iterate_safetensors
from research_rt.models.layers.linear import pack_linear_weights
from research_rt.models.registry import resolve_model_class

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: Any
    dtype: torch.dtype


def load_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    if source.is_gguf:  # config.json of the converted copy (gguf_cache.py says why)
        return AutoConfig.from_pretrained(str(gguf_cache.converted_dir(source.gguf_path)))
    return AutoConfig.from_pretrained(str(source.directory))


def load_tokenizer(source: ModelSource, tokenizer_path: str | None = None) -> Any:
    from transformers import AutoTokenizer

    if tokenizer_path and tokenizer_path != source.path:
        from research_rt.loader.resolve import resolve_model_path

        source = resolve_model_path(tokenizer_path)
    if source.is_gguf:
        converted = gguf_cache.converted_dir(source.gguf_path)
        if gguf_cache.has_tokenizer(converted):
            return AutoTokenizer.from_pretrained(str(converted))
        return AutoTokenizer.from_pretrained(str(source.directory), gguf_file=source.gguf_file)
    return AutoTokenizer.from_pretrained(str(source.directory))


def generation_eos(source: ModelSource) -> Any:
    """`eos_token_id` of the checkpoint's generation_config.json (optional; None for GGUF)."""
    if source.is_gguf:
        return None
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(str(source.directory)).eos_token_id
    except Exception:  # noqa: BLE001 - generation_config.json is optional
        return None


def context_length(config: Any, requested: int | None) -> int:
    """The context length to serve: the model's `max_position_embeddings` unless a shorter one is
    requested; a longer one is refused (the position tables and trained positions end there)."""
    derived = int(config.max_position_embeddings)
    if requested and requested > derived:
        raise ValueError(
            f"User-specified context_length ({requested}) is greater than the derived context_length "
            f"({derived}) of the model; the rotary tables and trained positions end there."
        )
    return requested or derived


def resolve_dtype(dtype: str, config: Any, device: str) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if device == "cpu":
        return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else torch.float32
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg, str):
        cfg = DTYPES.get(cfg)
    return torch.float16 if cfg in (None, torch.float32) else cfg


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(config: Any, dtype: torch.dtype, device: str) -> torch.nn.Module:
    cls = resolve_model_class(getattr(config, "architectures", None))
    with _default_dtype(dtype), torch.device(device):
        model = cls(config)
    return model.eval().requires_grad_(False)


def weight_iterator(source: ModelSource, load_format: str) -> tuple[Any, int]:
    fmt = load_format
    if fmt == "auto":
        fmt = "gguf" if source.is_gguf else "safetensors"
    if fmt == "gguf":
        if not source.is_gguf:
            raise ValueError(f"load_format gguf needs a .gguf file, got {source.path}")
        converted = gguf_cache.converted_dir(source.gguf_path)
        if gguf_cache.has_weights(converted):  # the same float32 values, from plain files
            return iterate_safetensors(converted), count_safetensors(converted)
        return iterate_gguf(source.gguf_path), gguf_cache.gguf_tensor_count(source.gguf_path)
    if fmt == "safetensors":
        return iterate_safetensors(source.directory), count_safetensors(source.directory)
    raise ValueError(f"unsupported load_format {load_format!r}")


def load_weights_into(
    model: torch.nn.Module, source: ModelSource, load_format: str, progress: bool = True, plan: Any = None
) -> None:
    """Copy the checkpoint into `model`'s existing parameters (storage is kept: compiled code stays
    valid); with a tensor-parallel `plan` (tp_sharding.TPPlan), each tensor is cut to this rank's shard."""
    with _weights_written(model):
        if load_format == "dummy":
            gen = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            return
        weights, total = weight_iterator(source, load_format)
        bar = tqdm(weights, total=total, desc="Loading weights", disable=not progress, unit="tensor")
        loaded = model.load_weights(bar if plan is None else plan.shard(bar))
    missing = model.expected_weights() - loaded
    if missing:
        raise ValueError(f"checkpoint {source.path} lacks weights for: {', '.join(sorted(missing)[:8])}")


def copy_named_tensors(
    model: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]], direct: bool = False, plan: Any = None
) -> None:
    """Copy (name, tensor) pairs into `model`'s existing parameters (an update from tensors).
    Checkpoint names by default, through `model.load_weights` (fused projections and all); with
    `direct`, the model's own parameter names, all checked before anything is copied."""
    named = list(named)
    if plan is not None and direct:
        raise ValueError("load_format 'direct' names this runtime's parameters, which tp > 1 shards")
    if not direct:
        with _weights_written(model):
            model.load_weights(iter(named) if plan is None else plan.shard(named))
        return
    params = dict(model.named_parameters())
    for name, tensor in named:
        if name not in params:
            raise KeyError(f"{type(model).__name__} has no parameter named {name!r}")
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"shape mismatch for {name}: given {tuple(tensor.shape)} vs {tuple(params[name].shape)}"
            )
    with _weights_written(model):
        for name, tensor in named:
            params[name].data.copy_(tensor)


@contextlib.contextmanager
def _weights_written(model: torch.nn.Module) -> Iterator[None]:
    """Around writes through `.data` (the models' `load_weights` too): they bypass the version
    counters by which the gemv op notices a changed weight, so its packed copies are made again after."""
    try:
        yield
    finally:
        forget_packed_weights()
        pack_linear_weights(model)


def load_model(
    source: ModelSource,
    dtype: str,
    device: str,
    load_format: str = "auto",
    config: Any = None,
    plan: Any = None,
) -> LoadedModel:
    """The model of `config` with its weights; with a tensor-parallel `plan`, this rank's shard of
    it (built from the plan's per-rank config, its parallel layers swapped in)."""
    config = config or load_config(source)
    torch_dtype = resolve_dtype(dtype, config, device)
    if plan is None:
        model = build_model(config, torch_dtype, device)
    else:
        model = plan.parallelize(build_model(plan.rank_config(), torch_dtype, device))
    load_weights_into(model, source, load_format, plan=plan)
    logger.info(
        "Loaded %s (%s, %.1fM parameters)",
        source.path,
        torch_dtype,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return LoadedModel(model, config, torch_dtype)
