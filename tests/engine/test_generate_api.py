"""Engine.generate: response shape, logprob layout, stops, n, streaming, seeds and validation."""

from __future__ import annotations

import pytest

from research_rt.core.errors import RequestError

PROMPT = [101, 2045, 3999, 17, 42, 7, 900, 3120]


def test_response_shape_and_defaults(tiny_engine):
    out = tiny_engine.generate("Hello there", {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True})
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert list(meta) == [
        "id",
        "finish_reason",
        "prompt_tokens",
        "weight_version",
        "completion_tokens",
        "cached_tokens",
        "e2e_latency",
    ]
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert meta["weight_version"] == "default"  # --weight-version; /update_weight_version changes it
    assert meta["completion_tokens"] == len(out["output_ids"]) == 5
    assert meta["prompt_tokens"] == len(tiny_engine.tokenizer.encode("Hello there"))
    assert out["text"] == tiny_engine.tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    tiny_engine.check_pool_integrity()


def test_batch_returns_list_in_order(tiny_engine):
    outs = tiny_engine.generate(["a b c", "x y z w"], {"temperature": 0, "max_new_tokens": 3})
    singles = [tiny_engine.generate(p, {"temperature": 0, "max_new_tokens": 3}) for p in ["a b c", "x y z w"]]
    assert [o["output_ids"] for o in outs] == [s["output_ids"] for s in singles]


def test_logprob_layout_v045(tiny_engine):
    n = len(PROMPT)
    greedy = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    default = tiny_engine.generate(input_ids=PROMPT, sampling_params=greedy, return_logprob=True)
    meta = default["meta_info"]
    assert meta["input_token_logprobs"] == [[None, PROMPT[-1], None]]
    assert len(meta["output_token_logprobs"]) == 4
    assert [e[1] for e in meta["output_token_logprobs"]] == default["output_ids"]

    full = tiny_engine.generate(
        input_ids=PROMPT,
        sampling_params=greedy,
        return_logprob=True,
        logprob_start_len=3,
        top_logprobs_num=3,
        token_ids_logprob=[5, 6],
    )
    meta = full["meta_info"]
    assert len(meta["input_token_logprobs"]) == n - 3
    assert meta["input_token_logprobs"][0][0] is None
    assert [e[1] for e in meta["input_token_logprobs"]] == PROMPT[3:]
    assert meta["input_top_logprobs"][0] is None and all(len(x) == 3 for x in meta["input_top_logprobs"][1:])
    assert len(meta["output_top_logprobs"]) == 4
    for chosen, top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert top[0][1] == chosen[1] and top[0][0] == pytest.approx(chosen[0])
        assert top[0][0] >= top[1][0] >= top[2][0]
    assert meta["input_token_ids_logprobs"][0] is None
    assert [e[1] for e in meta["output_token_ids_logprobs"][0]] == [5, 6]
    # the same positions scored with max_new_tokens=0 agree with the generated tokens' logprobs
    score = tiny_engine.generate(
        input_ids=PROMPT + full["output_ids"],
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=0,
    )
    assert score["meta_info"]["completion_tokens"] == 0 and score["output_ids"] == []
    rescored = [e[0] for e in score["meta_info"]["input_token_logprobs"][n:]]
    assert rescored == pytest.approx([e[0] for e in meta["output_token_logprobs"]], abs=1e-4)
    tiny_engine.check_pool_integrity()


def test_stop_strings_and_token_ids(tiny_engine):
    base = tiny_engine.generate(
        input_ids=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    )
    text = base["text"]
    stop = text[4:7]
    assert stop and stop.strip(), f"degenerate sample text {text!r}"
    out = tiny_engine.generate(
        input_ids=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 12, "stop": stop}
    )
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.find(stop)]
    kept = tiny_engine.generate(
        input_ids=PROMPT,
        sampling_params={"temperature": 0, "max_new_tokens": 12, "stop": stop, "no_stop_trim": True},
    )
    assert kept["text"].endswith(stop) or stop in kept["text"]
    tid = base["output_ids"][5]
    by_id = tiny_engine.generate(
        input_ids=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 12, "stop_token_ids": [tid]}
    )
    first = base["output_ids"].index(tid)
    assert by_id["output_ids"] == base["output_ids"][: first + 1]
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": tid}
    assert by_id["meta_info"]["completion_tokens"] == first + 1
    tiny_engine.check_pool_integrity()


def test_n_samples_and_seeds(tiny_engine):
    params = {"temperature": 1.0, "max_new_tokens": 8, "n": 3, "sampling_seed": 1234, "ignore_eos": True}
    a = tiny_engine.generate(input_ids=PROMPT, sampling_params=params)
    b = tiny_engine.generate(input_ids=PROMPT, sampling_params=params)
    assert isinstance(a, list) and len(a) == 3
    assert [x["output_ids"] for x in a] == [x["output_ids"] for x in b]
    assert len({tuple(x["output_ids"]) for x in a}) > 1
    assert all(x["meta_info"]["cached_tokens"] == len(PROMPT) - 1 for x in a)
    tiny_engine.check_pool_integrity()


def test_stream_is_cumulative(tiny_engine):
    chunks = list(
        tiny_engine.generate(
            input_ids=PROMPT,
            sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
            stream=True,
        )
    )
    assert len(chunks) == 6
    for prev, cur in zip(chunks, chunks[1:]):
        assert cur["text"].startswith(prev["text"])
        assert cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert "e2e_latency" in chunks[-1]["meta_info"] and "e2e_latency" not in chunks[0]["meta_info"]


def test_min_new_tokens_and_max_new_tokens_zero(tiny_engine):
    out = tiny_engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    base = tiny_engine.generate(
        input_ids=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    )
    stop_tok = base["output_ids"][0]
    forced = tiny_engine.generate(
        input_ids=PROMPT,
        sampling_params={
            "temperature": 0,
            "max_new_tokens": 6,
            "stop_token_ids": [stop_tok],
            "min_new_tokens": 3,
        },
    )
    assert forced["meta_info"]["completion_tokens"] >= 3
    assert stop_tok not in forced["output_ids"][:3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"input_ids": [1, 2], "sampling_params": {"temperature": -1}},
            "temperature must be non-negative, got -1.",
        ),
        ({"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, "top_p must be in (0, 1], got 0."),
        (
            {"input_ids": [1, 2], "sampling_params": {"top_k": 0}},
            "top_k must be -1 (disable) or at least 1, got 0.",
        ),
        ({"input_ids": [1, 2], "sampling_params": {"bogus": 1}}, "Unknown sampling parameter(s): bogus."),
        (
            {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "ten"}},
            "sampling_params.max_new_tokens has the wrong type",
        ),
        ({"input_ids": []}, "input_ids cannot be empty."),
        ({"input_ids": [10**9]}, "outside the vocabulary"),
        ({"input_ids": list(range(600))}, "is longer than the model's context length (512 tokens)."),
        (
            {"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 3},
            "logprob_start_len, (3) is higher than the number of input tokens (3).",
        ),
        ({"prompt": "hi", "input_ids": [1, 2]}, "cannot be provided at the same time"),
        ({}, "Either text, input_ids or input_embeds should be provided."),
    ],
)
def test_validation_errors(tiny_engine, kwargs, message):
    with pytest.raises(RequestError) as err:
        tiny_engine.generate(**kwargs)
    assert message in err.value.message
    tiny_engine.check_pool_integrity()


def test_abort_frees_slots(tiny_engine):
    import threading
    import time

    results = []

    def run():
        results.append(
            tiny_engine.generate(
                input_ids=PROMPT, rid="to-abort", sampling_params={"max_new_tokens": 400, "ignore_eos": True}
            )
        )

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    tiny_engine.abort_request("to-abort")
    t.join(timeout=30)
    assert results and results[0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert results[0]["meta_info"]["completion_tokens"] < 400
    tiny_engine.check_pool_integrity()
