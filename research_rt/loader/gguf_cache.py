"""A GGUF file converted once into a Hugging Face directory (config, tokenizer, float32 safetensors)
kept in a cache, so that later loads read plain files instead of parsing the GGUF again.

Why: gguf's reader parses every metadata field through numpy memmap slices, the tokenizer's 49,152
strings and 48,900 merges included: about 11 s a parse here (cProfile of
`AutoConfig.from_pretrained(gguf_file=...)`, 2026-12-02), and config, tokenizer, tensor count and
weights each parsed the file again: 37 s from `server_args=` to `Loaded` for the embedded SmolLM2.
From the converted directory the same load takes about a second.

The weights are stored dequantized in float32, which holds every GGUF block format exactly, so a
converted load gives bit-identical parameters; files whose float32 weights would pass
`RESEARCH_RT_GGUF_CACHE_MAX_BYTES` (default 8 GiB) keep only config and tokenizer in the cache and
stream their weights from the GGUF. The cache lives under `RESEARCH_RT_CACHE_DIR` (default
`~/.cache/research_rt`), one directory per file keyed by name, size and modification time; it is
written to a temporary directory and renamed into place, so concurrent starts (data-parallel
workers) never read a half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_MAX_WEIGHT_BYTES = 8 << 30
SHARD_BYTES = 2 << 30
DONE_MARKER = "research_rt_gguf.json"
# GGUF's `general.architecture` -> the transformers class the registry knows
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def cache_root() -> Path:
    root = os.environ.get("RESEARCH_RT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "research_rt"
    )
    return Path(root) / "gguf"


def cache_dir_for(file: Path) -> Path:
    st = file.stat()
    return cache_root() / f"{file.stem}-{st.st_size}-{st.st_mtime_ns}-v{FORMAT_VERSION}"


def gguf_tensor_count(file: Path) -> int:
    """The tensor count from the GGUF header (magic, version, then n_tensors as uint64): no parse."""
    with open(file, "rb") as f:
        head = f.read(16)
    if len(head) < 16 or head[:4] != b"GGUF":
        raise ValueError(f"{file} is not a GGUF file")
    return struct.unpack("<Q", head[8:16])[0]


def converted_dir(file: Path) -> Path:
    """The converted directory of `file`, converting it first if the cache has none."""
    out = cache_dir_for(file)
    if (out / DONE_MARKER).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        _convert(file, tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first: use its copy
            if not (out / DONE_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def has_weights(directory: Path) -> bool:
    return json.loads((directory / DONE_MARKER).read_text())["weights"]


def has_tokenizer(directory: Path) -> bool:
    return json.loads((directory / DONE_MARKER).read_text())["tokenizer"]


def _convert(file: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    t0 = time.monotonic()
    logger.info("Converting %s once into %s (config, tokenizer, float32 weights)...", file.name, out.parent)
    config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    if not getattr(config, "architectures", None):  # GGUF metadata names the family, not the class
        config.architectures = [GGUF_ARCHITECTURES.get(config.model_type, config.model_type)]
    config.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name).save_pretrained(out)
        tokenizer = True
    except Exception as e:  # noqa: BLE001 - a GGUF without a tokenizer still serves input_ids
        logger.warning("No tokenizer converted from %s: %s", file.name, e)
        tokenizer = False
    weights = _float32_bytes(config) <= int(
        os.environ.get("RESEARCH_RT_GGUF_CACHE_MAX_BYTES", DEFAULT_MAX_WEIGHT_BYTES)
    )
    if weights:
        _write_weights(file, out)
    (out / DONE_MARKER).write_text(
        json.dumps(
            {"source": str(file), "tokenizer": tokenizer, "weights": weights, "version": FORMAT_VERSION}
        )
    )
    logger.info("Converted %s in %.1f s", file.name, time.monotonic() - t0)


def _float32_bytes(config) -> int:
    h, n = int(config.hidden_size), int(config.num_hidden_layers)
    inter = int(getattr(config, "intermediate_size", 4 * h))
    experts = int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0) or 1)
    return 4 * (2 * int(config.vocab_size) * h + n * (4 * h * h + 3 * h * inter * experts))


def _write_weights(file: Path, out: Path) -> None:
    """Dequantized tensors in ~2 GiB safetensors shards with an index, as transformers writes them."""
    from safetensors.torch import save_file

    from research_rt.loader.weights import iterate_gguf

    weight_map: dict[str, str] = {}
    shard: dict = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(out / name))
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, tensor in iterate_gguf(file):
        if shard and size + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        size += tensor.nbytes
    if shard:
        flush()
    index = {"metadata": {"converted_from": file.name}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
