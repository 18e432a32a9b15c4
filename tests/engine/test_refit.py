"""The Engine's refit API on a live engine: pause (abort / retract / in_place) and continue with
the greedy output unchanged, requests sent while paused waiting, weight versions in meta_info,
updates from tensors (checked against transformers on the new weights, rolled back on failure),
the weights checker, and priority scheduling end to end."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from research_rt.core.errors import RequestError
from research_rt.engine.weights_checker import WeightsChecker
from research_rt.frontend.request_builder import RequestBuilder
from research_rt.server_args import ServerArgs
from tests.conftest import eager_engine, hf_greedy, make_tiny_checkpoint

PROMPT = [101, 2045, 3999, 17, 42, 7, 900, 3120]
LONG = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
SHORT = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    e = eager_engine(
        str(tiny_llama_dir),
        dtype="float32",
        random_seed=0,
        enable_priority_scheduling=True,
        max_running_requests=1,
    )
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def ref(engine) -> list[int]:
    return engine.generate(input_ids=PROMPT, sampling_params=LONG)["output_ids"]


@pytest.fixture(scope="module")
def tiny_b(tmp_path_factory, smollm_tokenizer_dir):
    """Other random weights for the same architecture (a "trained" checkpoint)."""
    out = tmp_path_factory.mktemp("tiny_b")
    return make_tiny_checkpoint(
        "LlamaForCausalLM", out, vocab_size=49152, seed=1, tokenizer_dir=smollm_tokenizer_dir
    )


def progress(engine) -> tuple[list[tuple[str, int, int]], int]:
    """(running requests' (rid, output tokens, kv_len), queue length), read on the scheduler thread."""
    s = engine.scheduler
    return engine.call_in_scheduler(
        lambda: ([(r.rid, len(r.output_ids), r.kv_len) for r in s.running], len(s.waiting))
    )


def started_stream(engine, params=LONG, **kw):
    stream = engine.generate(input_ids=PROMPT, sampling_params=params, stream=True, **kw)
    for chunk in stream:
        if len(chunk["output_ids"]) >= 5:
            return stream
    raise AssertionError("the stream ended early")


# ---------------------------------------------------------------- pause
@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_pause_and_continue_keep_the_greedy_output(engine, ref, mode):
    stream = started_stream(engine)
    engine.pause_generation(mode)
    assert engine.paused == mode
    before = progress(engine)
    time.sleep(0.3)
    assert progress(engine) == before, "a paused engine made progress"
    running, queued = before
    if mode == "in_place":
        assert len(running) == 1 and running[0][2] > len(PROMPT) and queued == 0  # KV kept
    else:
        assert running == [] and queued == 1
        assert engine.flush_cache() is True  # nothing holds KV: a refit may drop the cache
    assert engine.continue_generation() is True and engine.paused is None
    final = list(stream)[-1]
    assert final["output_ids"] == ref and final["meta_info"]["finish_reason"]["type"] == "length"
    engine.check_pool_integrity()


def test_abort_pause_and_requests_sent_while_paused_wait(engine, ref):
    stream = started_stream(engine)
    engine.pause_generation("abort")
    last = list(stream)[-1]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["output_ids"] == ref[: len(last["output_ids"])]
    result: dict = {}
    t = threading.Thread(
        target=lambda: result.update(out=engine.generate(input_ids=PROMPT, sampling_params=SHORT))
    )
    t.start()
    t.join(0.5)
    assert t.is_alive(), "a request sent while paused did not wait"
    assert engine.load().num_queue_reqs == 1
    engine.continue_generation()
    t.join(60)
    assert result["out"]["output_ids"] == ref[:8]
    assert engine.continue_generation() is False  # not paused
    with pytest.raises(RequestError, match="Field 'mode' must be one of abort, retract, in_place"):
        engine.pause_generation("later")
    engine.check_pool_integrity()


# ---------------------------------------------------------------- versions and weights
def test_weight_version_in_meta_info(engine):
    assert engine.weight_version == "default"
    assert (
        engine.generate(input_ids=PROMPT, sampling_params=SHORT)["meta_info"]["weight_version"] == "default"
    )
    engine.update_weight_version("step-7")
    meta = engine.generate(input_ids=PROMPT, sampling_params=SHORT, stream=True)
    assert all(chunk["meta_info"]["weight_version"] == "step-7" for chunk in meta)
    with pytest.raises(RequestError, match="new_version"):
        engine.update_weight_version("")
    engine.update_weight_version("default")


def test_update_from_tensors_matches_transformers_and_rolls_back(engine, ref, tiny_llama_dir, tiny_b):
    from transformers import AutoModelForCausalLM

    base_sum = engine.check_weights("checksum")[2]["per_gpu_checksum"]
    ok, message = engine.update_weights_from_tensor(
        load_file(tiny_b / "model.safetensors"), weight_version="b"
    )
    assert (ok, message) == (True, "Succeeded to update model weights. Weight version updated to b.")
    out = engine.generate(input_ids=PROMPT, sampling_params=SHORT)
    assert out["meta_info"]["weight_version"] == "b"
    hf_b = AutoModelForCausalLM.from_pretrained(tiny_b, dtype=torch.float32).eval()
    assert out["output_ids"] == hf_greedy(hf_b, PROMPT, 8)  # not a cached prefix of the old weights
    b_params = [(n, p.detach().clone()) for n, p in engine.runner.model.named_parameters()]

    # a bad tensor part-way: everything is rolled back
    bad = [("model.norm.weight", torch.zeros(64)), ("model.layers.0.nope.weight", torch.zeros(3))]
    ok, message = engine.update_weights_from_tensor(bad)
    assert not ok and message.startswith("Failed to update weights:") and "Rolling back" in message
    assert engine.generate(input_ids=PROMPT, sampling_params=SHORT)["output_ids"] == out["output_ids"]
    ok, message = engine.update_weights_from_tensor([("model.norm.weight", torch.zeros(3))])
    assert not ok and "shape mismatch for model.norm.weight" in message
    ok, message = engine.update_weights_from_tensor(b_params[:1], load_format="pt")
    assert not ok and "Unsupported load_format 'pt'" in message
    with pytest.raises(RequestError, match=r"named_tensors\[0\]"):
        engine.update_weights_from_tensor([("x", [1, 2])])

    # back to the first weights by checkpoint names, then to B again by runtime names ("direct")
    assert engine.update_weights_from_tensor(load_file(tiny_llama_dir / "model.safetensors"))[0]
    assert engine.check_weights("checksum")[2]["per_gpu_checksum"] == base_sum
    assert engine.generate(input_ids=PROMPT, sampling_params=LONG)["output_ids"] == ref
    assert engine.update_weights_from_tensor(b_params, load_format="direct") == (
        True,
        "Succeeded to update model weights.",
    )
    assert engine.generate(input_ids=PROMPT, sampling_params=SHORT)["output_ids"] == out["output_ids"]
    ok, message = engine.update_weights_from_tensor([("qkv.weight", torch.zeros(1))], load_format="direct")
    assert not ok and "no parameter named 'qkv.weight'" in message
    assert engine.update_weights_from_tensor(load_file(tiny_llama_dir / "model.safetensors"))[0]
    engine.update_weight_version("default")
    engine.check_pool_integrity()


def test_weights_checker(engine, ref, tiny_llama_dir):
    ok, message, payload = engine.check_weights("checksum")
    params = dict(engine.runner.model.named_parameters())
    assert (
        ok and set(payload["checksums"]) == set(params) and message == f"Checksums of {len(params)} tensors."
    )
    name, p = next(iter(params.items()))
    assert payload["checksums"][name] == hashlib.sha256(p.detach().contiguous().numpy().tobytes()).hexdigest()
    assert payload["parallelism_info"]["tp_size"] == 1 and len(payload["per_gpu_checksum"]) == 64

    assert engine.check_weights("snapshot")[:2] == (True, f"Snapshot of {len(params)} tensors taken.")
    assert engine.check_weights("compare")[:2] == (True, f"All {len(params)} tensors equal the snapshot.")
    norm = engine.runner.model.model.norm.weight.detach().clone()
    engine.update_weights_from_tensor([("model.norm.weight", norm * 2)])
    ok, message, _ = engine.check_weights("compare")
    assert (
        not ok and message.startswith(f"1 of {len(params)} tensors differ") and "model.norm.weight" in message
    )
    assert engine.check_weights("checksum")[2]["per_gpu_checksum"] != payload["per_gpu_checksum"]

    assert engine.check_weights("reset_tensors")[0]
    ok, message, _ = engine.check_weights("compare")
    assert not ok and message.startswith(f"{len(params)} of {len(params)} tensors differ")
    assert engine.generate(input_ids=PROMPT, sampling_params=SHORT)["output_ids"] != ref[:8]
    engine.update_weights_from_tensor(load_file(tiny_llama_dir / "model.safetensors"))
    assert engine.check_weights("compare")[0] and engine.check_weights("checksum")[2] == payload
    assert engine.generate(input_ids=PROMPT, sampling_params=LONG)["output_ids"] == ref

    ok, message, _ = engine.check_weights("weigh")
    assert not ok and message.startswith("Field 'action' must be one of checksum, snapshot, compare")
    fresh = WeightsChecker().handle(engine.runner.model, "compare", None)
    assert fresh[0] is False and "action 'snapshot' first" in fresh[1]


# ---------------------------------------------------------------- priority
def test_priority_orders_a_queued_batch(engine):
    engine.pause_generation("in_place")  # everything below queues up together
    result: dict = {}
    prompts = [PROMPT, PROMPT[::-1], PROMPT[2:]]
    t = threading.Thread(
        target=lambda: result.update(
            outs=engine.generate(input_ids=prompts, sampling_params=SHORT, priority=[0, 20, 5])
        )
    )
    t.start()
    while engine.load().num_queue_reqs < 3:
        time.sleep(0.01)
    engine.continue_generation()
    t.join(60)
    latency = [o["meta_info"]["e2e_latency"] for o in result["outs"]]
    assert latency[1] < latency[2] < latency[0]  # max_running_requests 1: one after the other, by priority


def test_urgent_request_preempts_and_the_preempted_one_resumes(engine, ref):
    retractions = engine.call_in_scheduler(lambda: engine.scheduler.counters.num_retractions)
    done: dict = {}

    def low() -> None:
        done["low"] = list(engine.generate(input_ids=PROMPT, sampling_params=LONG, stream=True, priority=0))[
            -1
        ]
        done["low_at"] = time.monotonic()

    t = threading.Thread(target=low)
    t.start()
    while not progress(engine)[0] or progress(engine)[0][0][1] < 5:
        time.sleep(0.01)
    urgent = engine.generate(input_ids=PROMPT[::-1], sampling_params=SHORT, priority=50)
    urgent_at = time.monotonic()
    t.join(60)
    assert urgent_at < done["low_at"]
    assert done["low"]["output_ids"] == ref
    assert (
        urgent["output_ids"] == engine.generate(input_ids=PROMPT[::-1], sampling_params=SHORT)["output_ids"]
    )
    assert engine.call_in_scheduler(lambda: engine.scheduler.counters.num_retractions) > retractions
    with pytest.raises(RequestError, match="Field 'priority' must be an integer"):
        engine.generate(input_ids=PROMPT, sampling_params=SHORT, priority="high")
    engine.check_pool_integrity()


def test_priority_when_disabled_is_ignored_or_refused(tiny_engine):
    out = tiny_engine.generate(input_ids=PROMPT, sampling_params=SHORT, priority=3)  # ignored
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    args = ServerArgs(abort_on_priority_when_disabled=True, random_seed=0)
    builder = RequestBuilder(tiny_engine.tokenizer, args, tiny_engine.config, 512, 4096, frozenset())
    from research_rt.frontend.generate_input import GenerateInput

    with pytest.raises(RequestError, match="priority scheduling is disabled"):
        builder.make_reqs(GenerateInput(input_ids=PROMPT, priority=3))
    assert builder.make_reqs(GenerateInput(input_ids=PROMPT))[0][0].priority is None
