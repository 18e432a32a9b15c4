"""capture / steer / ablate and return_hidden_states through Engine.generate, on the tiny Llama
(2 layers, hidden 64, 4 heads, MLP 128), float32, checked against transformers and against
runs without the intervention."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from research_rt.core.errors import RequestError
from research_rt.frontend.response import decode_captured
from tests.conftest import eager_engine

G = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
A = [5, 17, 33, 100, 7, 9, 2000, 31000]
B = [8, 9, 10, 11, 300, 301, 302, 1, 2, 45000, 12]
ALL_SITES = ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    e = eager_engine(
        str(tiny_llama_dir),
        dtype="float32",
        random_seed=0,
        enable_interventions=True,
        enable_return_hidden_states=True,
    )
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def captured(out) -> dict[tuple[int, str], tuple[list[int], np.ndarray]]:
    return {
        (c["layer"], c["site"]): (c["positions"], decode_captured(c)) for c in out["meta_info"]["captured"]
    }


def run(engine, prompt=A, **kw):
    out = engine.generate(input_ids=prompt, sampling_params=G, **kw)
    engine.check_pool_integrity()
    return out


# float32 against transformers: the linears sum in another order (the gemv op, oneDNN's GEMM on this
# CPU), so elements differ by a few float32 ulps of the vector's scale (1.01e-5 on one element of
# magnitude 4e-4 on an Intel Xeon): a tolerance of the hidden size's scale, not of each element
FP32 = {"atol": 5e-5, "rtol": 1e-4}


def test_resid_post_matches_transformers_hidden_states(engine, hf):
    out = run(engine, capture={"layers": [0, 1], "sites": ["resid_post"], "positions": "all"})
    caps = captured(out)
    seq = A + out["output_ids"][:-1]  # every position the model computed: prompt and output
    with torch.no_grad():
        ref = hf(torch.tensor([seq]), output_hidden_states=True).hidden_states
    positions, layer0 = caps[(0, "resid_post")]
    assert positions == list(range(len(seq)))
    assert layer0.shape == (len(seq), 64)
    torch.testing.assert_close(torch.tensor(layer0), ref[1][0], **FP32)
    # the last entry of output_hidden_states has the final norm applied; resid_post does not
    last = torch.tensor(caps[(1, "resid_post")][1])
    torch.testing.assert_close(hf.model.norm(last), ref[2][0], **FP32)
    assert out["output_ids"] == run(engine)["output_ids"]  # capturing changes nothing


def test_sites_compose_the_residual_stream(engine, hf):
    caps = captured(run(engine, capture={"layers": "all", "sites": ALL_SITES, "format": "list"}))
    for layer in (0, 1):
        pre, attn, mid, mlp, post = (caps[(layer, s)][1] for s in ALL_SITES)
        np.testing.assert_allclose(mid, pre + attn, atol=1e-6)
        np.testing.assert_allclose(post, mid + mlp, atol=1e-6)
    np.testing.assert_array_equal(caps[(1, "resid_pre")][1], caps[(0, "resid_post")][1])
    embed = hf.model.embed_tokens.weight[torch.tensor(A)].detach().numpy()
    np.testing.assert_array_equal(caps[(0, "resid_pre")][1][: len(A)], embed)


def test_formats_and_positions(engine):
    base = {"layers": [1], "sites": ["mlp_out"]}
    full = run(engine, capture={**base, "format": "list"})
    entry = full["meta_info"]["captured"][0]
    assert set(entry) == {"layer", "site", "positions", "shape", "dtype", "data"}
    assert entry["dtype"] == "float32" and isinstance(entry["data"], list)
    b64 = run(engine, capture=base)["meta_info"]["captured"][0]
    raw = np.frombuffer(base64.b64decode(b64["data"]), dtype="<f4").reshape(b64["shape"])
    np.testing.assert_array_equal(raw, np.asarray(entry["data"], dtype=np.float32))
    last_pos = len(A) + G["max_new_tokens"] - 2
    last = captured(run(engine, capture={**base, "positions": "last"}))[(1, "mlp_out")]
    assert last[0] == [last_pos]
    np.testing.assert_allclose(last[1][0], raw[last_pos], atol=1e-5)
    picked = captured(run(engine, capture={**base, "positions": [0, 3, last_pos]}))[(1, "mlp_out")]
    assert picked[0] == [0, 3, last_pos]
    np.testing.assert_allclose(picked[1], raw[[0, 3, last_pos]], atol=1e-5)


def test_logit_lens_of_the_last_layer_is_the_output(engine, hf):
    out = run(engine, capture={"layers": [0, 1], "sites": ["logit_lens", "resid_post"], "top_k": 3})
    lens = next(c for c in out["meta_info"]["captured"] if c["site"] == "logit_lens" and c["layer"] == 1)
    assert lens["shape"] == [len(A) + 5, 3] and len(lens["tokens"]) == len(lens["token_ids"])
    top1 = [row[0] for row in lens["token_ids"]]
    assert top1[len(A) - 1 :] == out["output_ids"]  # greedy: the top token at each position is the next one
    resid0 = torch.tensor(captured(out)[(0, "resid_post")][1])
    with torch.no_grad():
        ref = torch.log_softmax(hf.lm_head(hf.model.norm(resid0)), dim=-1).topk(3)
    lens0 = next(c for c in out["meta_info"]["captured"] if c["site"] == "logit_lens" and c["layer"] == 0)
    assert lens0["token_ids"] == ref.indices.tolist()
    np.testing.assert_allclose(decode_captured(lens0), ref.values.numpy(), atol=1e-4)


def test_steer_adds_the_vector_where_asked(engine):
    vec = torch.linspace(-1, 1, 64)
    capture = {"layers": [0, 1], "sites": ["resid_post"]}
    plain = captured(run(engine, capture=capture))
    steer = [{"layer": 0, "site": "resid_post", "vector": vec.tolist(), "scale": 2.5, "positions": [4, 5]}]
    steered = run(engine, capture=capture, steer=steer)
    caps = captured(steered)
    diff = caps[(0, "resid_post")][1] - plain[(0, "resid_post")][1]
    np.testing.assert_allclose(diff[[4, 5]], np.stack([2.5 * vec.numpy()] * 2), atol=1e-5)
    assert np.abs(diff[:4]).max() == 0  # earlier positions untouched, at every layer
    assert np.abs(caps[(1, "resid_post")][1][:4] - plain[(1, "resid_post")][1][:4]).max() == 0
    # the rest of the prompt: layer 0 is changed only where steered, layer 1 attends to the change
    n = len(A)
    assert np.abs(diff[6:n]).max() == 0
    assert np.abs(caps[(1, "resid_post")][1][6:n] - plain[(1, "resid_post")][1][6:n]).min() > 0
    # base64 vector = list vector; a large steer changes the greedy output
    as_b64 = base64.b64encode(vec.numpy().astype("<f4").tobytes()).decode()
    b64 = run(engine, capture=capture, steer=[{**steer[0], "vector": as_b64}])
    assert b64["output_ids"] == steered["output_ids"]
    big = run(engine, steer=[{"layer": 1, "site": "mlp_out", "vector": (vec * 50).tolist()}])
    assert big["output_ids"] != run(engine)["output_ids"]


def test_ablations_zero_heads_and_neurons(engine):
    """Checked on the prompt's positions (an ablation may change the generated tokens after it)."""
    cap = {"layers": [0], "sites": ["attn_out", "mlp_out"]}
    n = len(A)

    def site(ablate, name):
        return captured(run(engine, capture=cap, ablate=ablate))[(0, name)][1][:n]

    full_attn, full_mlp = site(None, "attn_out"), site(None, "mlp_out")
    assert np.abs(site([{"layer": 0, "heads": [0, 1, 2, 3]}], "attn_out")).max() == 0  # o_proj has no bias
    # o_proj is linear: the outputs with head 0 and with heads 1-3 ablated sum to the full output
    h0, h123 = (
        site([{"layer": 0, "heads": [0]}], "attn_out"),
        site([{"layer": 0, "heads": [1, 2, 3]}], "attn_out"),
    )
    assert np.abs(h0 - full_attn).max() > 0
    np.testing.assert_allclose(h0 + h123, full_attn, atol=1e-5)
    # the same for MLP neurons (two entries on one layer merge); the attention output is unchanged
    lo = [{"layer": 0, "neurons": list(range(0, 40))}, {"layer": 0, "neurons": list(range(40, 64))}]
    hi = [{"layer": 0, "neurons": list(range(64, 128))}]
    np.testing.assert_allclose(site(lo, "mlp_out") + site(hi, "mlp_out"), full_mlp, atol=1e-5)
    np.testing.assert_array_equal(site(lo, "attn_out"), full_attn)
    # positions: ablating at position 5 only leaves the positions before it alone
    at5 = site([{"layer": 0, "neurons": list(range(128)), "positions": [5]}], "mlp_out")
    np.testing.assert_array_equal(at5[:5], full_mlp[:5])
    assert np.abs(at5[5]).max() == 0


def test_batch_rows_are_independent(engine):
    """Two requests with different interventions in one batch: each gets bit for bit what it gets
    in the same batch when the other has none, and the tokens it gets alone."""
    cap = {"layers": [0, 1], "sites": ["resid_post", "attn_out"]}
    steer_a = [{"layer": 0, "site": "resid_post", "vector": [0.5] * 64, "scale": 3.0}]
    ablate_b = [{"layer": 1, "heads": [1, 2]}]

    def batch(steer, ablate):
        outs = engine.generate(
            input_ids=[A, B], sampling_params=G, capture=cap, steer=steer, ablate=ablate, return_logprob=True
        )
        engine.check_pool_integrity()
        return outs

    both = batch([steer_a, None], [None, ablate_b])
    only_a = batch([steer_a, None], None)
    only_b = batch(None, [None, ablate_b])
    plain = batch(None, None)
    for mine, ref in ((both[0], only_a[0]), (both[1], only_b[1])):
        assert mine["output_ids"] == ref["output_ids"]
        assert mine["meta_info"]["output_token_logprobs"] == ref["meta_info"]["output_token_logprobs"]
        for key, (pos, data) in captured(mine).items():
            assert captured(ref)[key][0] == pos
            np.testing.assert_array_equal(data, captured(ref)[key][1])
    assert both[0]["output_ids"] != plain[0]["output_ids"] or both[1]["output_ids"] != plain[1]["output_ids"]
    alone_a = run(engine, A, capture=cap, steer=steer_a)
    alone_b = run(engine, B, capture=cap, ablate=ablate_b)
    for mine, alone in ((both[0], alone_a), (both[1], alone_b)):
        assert mine["output_ids"] == alone["output_ids"]
        for key, (_, data) in captured(mine).items():
            np.testing.assert_allclose(data, captured(alone)[key][1], atol=1e-4)


def test_radix_cache_keeps_intervened_prefixes_apart(engine):
    steer = [{"layer": 0, "site": "resid_post", "vector": [1.0] * 64, "scale": 4.0}]
    engine.flush_cache()
    cold_steered = run(engine, steer=steer)
    engine.flush_cache()
    cold_plain = run(engine)
    assert cold_steered["output_ids"] != cold_plain["output_ids"]
    # the plain prompt is cached now: a steered request must not use it ...
    again = run(engine, steer=steer)
    assert again["meta_info"]["cached_tokens"] == 0 and again["output_ids"] == cold_steered["output_ids"]
    # ... and a steered request inserts nothing a plain one could match
    engine.flush_cache()
    run(engine, steer=steer)
    assert engine.stats().num_cached_tokens == 0
    plain = run(engine)
    assert plain["meta_info"]["cached_tokens"] == 0 and plain["output_ids"] == cold_plain["output_ids"]
    # capture-only requests do not change the KV: they share the cache, up to their first position
    assert run(engine)["meta_info"]["cached_tokens"] == len(A) - 1
    at3 = run(engine, capture={"layers": [1], "positions": [3, 9]})
    assert at3["meta_info"]["cached_tokens"] == 3 and captured(at3)[(1, "resid_post")][0] == [3, 9]
    everything = run(engine, capture={"layers": [1]})
    assert everything["meta_info"]["cached_tokens"] == 0
    assert captured(everything)[(1, "resid_post")][0] == list(range(len(A) + 5))


def test_return_hidden_states_layout(engine, hf):
    out = run(engine, return_hidden_states=True)
    hs = out["meta_info"]["hidden_states"]
    assert len(hs) == 1 + G["max_new_tokens"] - 1  # prefill block, then one vector per decode step
    assert np.asarray(hs[0]).shape == (len(A), 64) and np.asarray(hs[1]).shape == (64,)
    seq = A + out["output_ids"][:-1]
    with torch.no_grad():
        ref = hf(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]
    ours = torch.tensor(hs[0] + hs[1:])
    torch.testing.assert_close(ours, ref, **FP32)
    assert list(out["meta_info"]).index("hidden_states") > list(out["meta_info"]).index("cached_tokens")


def test_compiled_decode_serves_plain_batches_only(engine, monkeypatch):
    """A decode batch without interventions takes the graph runner's path; one with them runs eager."""
    runner = engine.runner
    taken: list[int] = []

    class Recording:
        def can_run(self, batch):
            return batch.is_decode

        def run(self, batch):
            taken.append(batch.batch_size)
            return runner.model.compute_logits(runner.model(batch.input_ids, batch.positions, batch))

    monkeypatch.setattr(runner, "graph_runner", Recording())
    plain = run(engine)
    assert len(taken) == G["max_new_tokens"] - 1
    taken.clear()
    run(engine, capture={"layers": [0], "positions": "last"})
    assert taken == []
    assert plain["output_ids"] == run(engine)["output_ids"]


def test_validation_errors(engine, tiny_engine):
    with pytest.raises(RequestError, match="--enable-interventions"):
        tiny_engine.generate(input_ids=A, sampling_params=G, capture={"layers": [0]})
    with pytest.raises(RequestError, match="--enable-return-hidden-states"):
        tiny_engine.generate(input_ids=A, sampling_params=G, return_hidden_states=True)
    cases = [
        ({"capture": {"layers": [2]}}, "layer 2 is out of range; the model has 2 layers"),
        ({"capture": {"layers": [0], "sites": ["resid"]}}, "unknown site 'resid'"),
        ({"steer": [{"layer": 0, "vector": [1.0] * 63}]}, "has 63 values; the model's hidden size is 64"),
        ({"steer": [{"layer": 0, "site": "logit_lens", "vector": [0.0] * 64}]}, "unknown site 'logit_lens'"),
        ({"steer": [{"layer": 0, "vector": "!!"}]}, "not valid base64"),
        ({"ablate": [{"layer": 0, "heads": [4]}]}, "4 is out of range; layer 0 has 4 heads"),
        ({"ablate": [{"layer": 0}]}, 'either "heads" or "neurons"'),
        ({"capture": {"layers": [0], "positions": [13]}}, "position 13 is out of range"),
        ({"capture": {"layers": [0], "stride": 2}}, "Unknown key 'stride' in capture"),
        ({"capture": [{"layers": [0]}, None]}, "capture has 2 entries for a batch of 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RequestError, match=message.replace("(", r"\(")):
            engine.generate(input_ids=A, sampling_params=G, **kwargs)
    engine.check_pool_integrity()


def test_capture_byte_limit(tiny_llama_dir):
    with eager_engine(
        str(tiny_llama_dir), dtype="float32", enable_interventions=True, intervention_max_capture_bytes=4096
    ) as e:
        ok = e.generate(input_ids=A, sampling_params=G, capture={"layers": [0], "positions": "last"})
        assert ok["meta_info"]["captured"][0]["shape"] == [1, 64]  # 256 bytes
        with pytest.raises(RequestError, match="over this server's limit of 4096 bytes"):
            e.generate(input_ids=A, sampling_params=G, capture={"layers": [0, 1]})  # 13 x 2 x 256 bytes


def test_mixed_chunks_and_small_chunks_agree(engine, tiny_llama_dir):
    """With 4-token prefill chunks and decodes riding in prefill forwards (--enable-mixed-chunk),
    a steered request and a capturing one get the tokens and activations of the default engine."""
    cap = {"layers": [0, 1], "sites": ["resid_post"]}
    steer = [{"layer": 0, "site": "attn_out", "vector": [0.3] * 64, "scale": 2.0}]
    kwargs = dict(sampling_params=G, capture=cap, steer=[steer, None, steer])
    ref = engine.generate(input_ids=[A, B, B[:5]], **kwargs)
    with eager_engine(
        str(tiny_llama_dir),
        dtype="float32",
        enable_interventions=True,
        enable_mixed_chunk=True,
        chunked_prefill_size=4,
    ) as mixed:
        outs = mixed.generate(input_ids=[A, B, B[:5]], **kwargs)
        mixed.check_pool_integrity()
        assert mixed.call_in_scheduler(lambda: mixed.scheduler.counters.num_mixed_steps) > 0
    for mine, theirs in zip(outs, ref):
        assert mine["output_ids"] == theirs["output_ids"]
        for key, (pos, data) in captured(mine).items():
            assert captured(theirs)[key][0] == pos
            np.testing.assert_allclose(data, captured(theirs)[key][1], atol=1e-4)


def test_compiled_decode_graph_is_the_one_without_hooks(engine, monkeypatch):
    """The decode step torch.compile traces (fullgraph) for batches without interventions is op for
    op the graph of the same model whose hooks are replaced by the identity: they fold away."""
    import re

    from research_rt.core.forward_batch import ForwardMode
    from research_rt.executor.graph_runner import KV_ALIGN, DecodeGraphRunner
    from research_rt.models import llama

    r = engine.runner

    def trace() -> list[str]:
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        gr = DecodeGraphRunner(r.model, r.kv_pool, r.attn_backend, 8, r.device, use_cuda_graph=False)
        step = torch.compile(gr._step, backend=record, fullgraph=True)
        zeros = torch.zeros(2, dtype=torch.int64)
        meta = r.attn_backend.build_metadata(
            ForwardMode.DECODE, [0, 0], [1, 1], torch.zeros(2, KV_ALIGN, dtype=torch.int64), r.device
        )
        meta = r.attn_backend.pad_for_graph(meta, 2, KV_ALIGN)
        with torch.inference_mode():
            step(zeros, zeros.clone(), zeros.clone(), **r.attn_backend.tensors(meta))
        (gm,) = graphs
        return [re.sub(" at 0x[0-9a-f]+", "", f"{n.op} {n.target}") for n in gm.graph.nodes]

    with_hooks = engine.call_in_scheduler(trace)
    monkeypatch.setattr(llama, "intervene", lambda batch, layer, site, x: x)
    monkeypatch.setattr(llama, "ablate_heads", lambda batch, layer, o, heads: o)
    monkeypatch.setattr(llama, "ablate_neurons", lambda batch, layer, h: h)
    without = engine.call_in_scheduler(trace)
    torch._dynamo.reset()
    # qkv, o, gate_up, down per layer and the lm_head: F.linear, or the gemv op where it builds
    assert sum("linear" in op or "research_rt.gemv" in op for op in with_hooks) == 2 * 4 + 1
    assert with_hooks == without
