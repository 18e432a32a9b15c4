"""Responses are built from immutable snapshots, and the input's shape is decided once."""

from __future__ import annotations

import pytest

from research_rt.core.errors import RequestError
from research_rt.core.messages import ReqOutput
from research_rt.core.req import FinishReason, Req
from research_rt.core.sampling_params import SamplingParams
from research_rt.frontend.generate_input import GenerateInput
from research_rt.frontend.response import embedding_response, generate_response


def _req(**kwargs) -> Req:
    return Req(rid="r", input_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=4).normalize(), **kwargs)


def test_snapshot_does_not_follow_the_live_request():
    req = _req(return_logprob=True, top_logprobs_num=1)
    req.output_ids.append(7)
    req.output_token_logprobs.append((-0.5, 7))
    req.output_top_logprobs.append([(-0.5, 7)])
    snap = ReqOutput.of(req, "x")
    req.output_ids.append(8)  # the scheduler moves on
    req.output_token_logprobs.append((-0.1, 8))
    req.finished_reason = FinishReason("length", length=2)
    resp = generate_response(snap, tokenizer=None)
    assert resp["output_ids"] == [7] and resp["token_ids"] == [7] and resp["text"] == "x"
    meta = resp["meta_info"]
    assert meta["completion_tokens"] == 1 and meta["finish_reason"] is None and "e2e_latency" not in meta
    assert meta["output_token_logprobs"] == [[-0.5, 7, None]]
    assert meta["output_top_logprobs"] == [[[-0.5, 7, None]]]
    assert "input_token_ids_logprobs" not in meta  # not asked for


def test_finished_snapshot_reports_reason_latency_and_error():
    req = _req()
    req.finished_reason = FinishReason(
        "abort", message="too big", status_code=400, err_type="BadRequestError"
    )
    snap = ReqOutput.of(req, None)
    assert snap.error == ("too big", 400)
    meta = generate_response(snap, tokenizer=None, ids_from=0)["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["e2e_latency"] >= 0
    req.finished_reason = FinishReason("abort", message="Abort requested")
    assert ReqOutput.of(req, None).error is None  # a plain abort is not a client error


def test_embedding_response():
    req = _req(return_embedding=True)
    req.embedding = [0.5, 0.5]
    req.finished_reason = FinishReason("length", length=0)
    resp = embedding_response(ReqOutput.of(req, None))
    assert resp["embedding"] == [0.5, 0.5] and resp["meta_info"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    "kwargs, single",
    [
        ({"text": "a"}, True),
        ({"text": ["a"]}, False),
        ({"text": "a", "sampling_params": {"n": 2}}, False),
        ({"text": "a", "sampling_params": [{}]}, False),
        ({"input_ids": [1, 2]}, True),
        ({"input_ids": [[1, 2]]}, False),
    ],
)
def test_single_response_rule(kwargs, single):
    assert GenerateInput(**kwargs).single_response is single


def test_prompts_parsed_once_and_errors_are_client_errors():
    obj = GenerateInput(text=["a", "b"])
    assert obj.prompts() is obj.prompts()
    with pytest.raises(RequestError):
        GenerateInput(text="a", input_ids=[1]).prompts()
