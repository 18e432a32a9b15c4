"""The GGUF conversion cache (loader/gguf_cache.py): a converted file gives the same config,
tokenizer-less load and bit-identical weights as reading the GGUF; it converts once; concurrent
converters agree; a file too large for the weight cache streams its weights from the GGUF."""

from __future__ import annotations

import threading

import gguf
import pytest
import torch

from research_rt.loader import gguf_cache
from research_rt.loader.model_loader import load_config, load_model
from research_rt.loader.resolve import resolve_model_path
from research_rt.loader.weights import iterate_gguf
from tests.conftest import make_tiny_checkpoint
from tests.loader.test_gguf import write_tiny_gguf


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_RT_CACHE_DIR", str(tmp_path / "cache"))
    hf_dir = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "hf", vocab_size=256)
    return write_tiny_gguf(hf_dir, tmp_path / "tiny-Q4_1.gguf", "Q4_1")


def test_header_count_matches_the_reader(tiny_gguf):
    assert gguf_cache.gguf_tensor_count(tiny_gguf) == len(gguf.GGUFReader(str(tiny_gguf)).tensors)


def test_converted_weights_are_the_gguf_weights(tiny_gguf):
    from research_rt.loader.weights import iterate_safetensors

    source = resolve_model_path(str(tiny_gguf))
    assert load_config(source).architectures == ["LlamaForCausalLM"]
    converted = gguf_cache.converted_dir(tiny_gguf)
    assert gguf_cache.has_weights(converted)
    direct = dict(iterate_gguf(tiny_gguf))
    cached = dict(iterate_safetensors(converted))
    assert direct.keys() == cached.keys() and direct
    for name, tensor in direct.items():
        assert torch.equal(tensor, cached[name]), name


def test_converts_once_and_concurrent_converters_agree(tiny_gguf):
    dirs: list = []
    threads = [
        threading.Thread(target=lambda: dirs.append(gguf_cache.converted_dir(tiny_gguf))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(dirs)) == 1
    marker = dirs[0] / gguf_cache.DONE_MARKER
    before = marker.stat().st_mtime_ns
    assert gguf_cache.converted_dir(tiny_gguf) == dirs[0]
    assert marker.stat().st_mtime_ns == before  # not converted again
    leftovers = [p for p in dirs[0].parent.iterdir() if p != dirs[0]]
    assert leftovers == []  # temporary directories removed


def test_too_large_for_the_weight_cache_streams_from_the_gguf(tiny_gguf, monkeypatch):
    monkeypatch.setenv("RESEARCH_RT_GGUF_CACHE_MAX_BYTES", "1")
    source = resolve_model_path(str(tiny_gguf))
    streamed = load_model(source, "float32", "cpu").model
    converted = gguf_cache.converted_dir(tiny_gguf)
    assert not gguf_cache.has_weights(converted)
    assert not list(converted.glob("*.safetensors"))
    monkeypatch.setenv("RESEARCH_RT_CACHE_DIR", str(tiny_gguf.parent / "cache2"))
    monkeypatch.delenv("RESEARCH_RT_GGUF_CACHE_MAX_BYTES")
    cached = load_model(source, "float32", "cpu").model
    for (name, a), (_, b) in zip(streamed.named_parameters(), cached.named_parameters(), strict=True):
        assert torch.equal(a, b), name
