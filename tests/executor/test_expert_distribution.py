"""Expert-distribution recording from the Python Engine: counts per layer = tokens x top_k, CSV format."""

from __future__ import annotations

import csv

import pytest

from research_rt.core.errors import RequestError
from tests.conftest import eager_engine, make_tiny_checkpoint


@pytest.mark.parametrize(
    ("name", "moe_layers", "experts", "top_k"),
    [("Qwen2MoeForCausalLM-normtopk-dense1", [0], 6, 3), ("MixtralForCausalLM", [0, 1], 4, 2)],
)
def test_expert_counts_and_csv(name, moe_layers, experts, top_k, tmp_path):
    path = make_tiny_checkpoint(name, tmp_path / "ckpt")
    engine = eager_engine(str(path), dtype="float32", skip_tokenizer_init=True, disable_radix_cache=True)
    try:
        sp = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
        engine.generate(input_ids=[3, 4, 5], sampling_params=sp)  # before recording: not counted
        engine.start_expert_distribution_record()
        prompts = [[5, 17, 99, 3, 250, 41, 7], [300, 1, 2, 3]]
        engine.generate(input_ids=prompts, sampling_params=sp)
        engine.stop_expert_distribution_record()
        engine.generate(input_ids=[3, 4, 5], sampling_params=sp)  # after stopping: not counted
        # every prompt token is forwarded once, then max_new_tokens - 1 decode tokens per request
        tokens = sum(len(p) + sp["max_new_tokens"] - 1 for p in prompts)
        csv_path = engine.dump_expert_distribution_record(str(tmp_path))
        with open(csv_path) as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["layer_id", "expert_id", "count"]
        body = rows[1:]
        assert all(len(r) == 3 and all(c.isdigit() for c in r) for r in body)
        assert [(int(r[0]), int(r[1])) for r in body] == [
            (layer, e) for layer in moe_layers for e in range(experts)
        ]
        for layer in moe_layers:
            assert sum(int(r[2]) for r in body if int(r[0]) == layer) == tokens * top_k
        # the dump reset the counts
        again = engine.dump_expert_distribution_record(str(tmp_path))
        with open(again) as f:
            assert all(r[2] == "0" for r in list(csv.reader(f))[1:])
        engine.check_pool_integrity()
    finally:
        engine.shutdown()


def test_non_moe_model_has_no_expert_distribution(tiny_engine):
    with pytest.raises(RequestError, match="not a MoE"):
        tiny_engine.start_expert_distribution_record()
