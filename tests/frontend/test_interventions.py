"""frontend/interventions.py: what a valid spec becomes, and a clear 400 for each mistake."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from research_rt.core.errors import RequestError
from research_rt.core.interventions import InterventionShape
from research_rt.frontend.interventions import InterventionParser, for_item
from research_rt.server_args import ServerArgs

SHAPE = InterventionShape(
    num_layers=4, hidden_size=8, num_heads=2, intermediate_sizes=(16, 0, 16, 16), vocab_size=50
)
ON = ServerArgs(enable_interventions=True, enable_return_hidden_states=True)


def parse(capture=None, steer=None, ablate=None, hidden=False, args=ON, shape=SHAPE, prompt_len=5, new=4):
    return InterventionParser(args, shape).parse(capture, steer, ablate, hidden, prompt_len, new)


def test_nothing_asked_is_none_and_flags_gate_each_field():
    assert parse() is None
    off = ServerArgs()
    assert InterventionParser(off, SHAPE).parse(None, [], None, False, 5, 4) is None
    for kwargs in ({"capture": {"layers": [0]}}, {"steer": [{}]}, {"ablate": [{}]}):
        with pytest.raises(RequestError, match=r"--enable-interventions \(ServerArgs.enable_interventions\)"):
            parse(args=off, **kwargs)
    with pytest.raises(RequestError, match="--enable-return-hidden-states"):
        parse(hidden=True, args=ServerArgs(enable_interventions=True))
    with pytest.raises(RequestError, match="does not support interventions"):
        parse(capture={"layers": [0]}, shape=None)
    assert parse(hidden=True, shape=None).hidden_states  # hidden states need no layer access


def test_valid_spec():
    vec = np.arange(8, dtype="<f4")
    spec = parse(
        capture={
            "layers": [2, 0, 2],
            "sites": ["attn_out", "logit_lens"],
            "positions": [7, 1, 7],
            "top_k": 3,
        },
        steer=[
            {"layer": 1, "site": "mlp_out", "vector": vec.tolist(), "scale": -2},
            {"layer": 3, "vector": base64.b64encode(vec.tobytes()).decode(), "positions": [0]},
        ],
        ablate=[{"layer": 0, "heads": [1, 1]}, {"layer": 2, "neurons": [15, 0]}],
    )
    cap = spec.capture
    assert (cap.layers, cap.sites, cap.positions, cap.format, cap.top_k) == (
        (2, 0),
        ("attn_out", "logit_lens"),
        (1, 7),
        "base64",
        3,
    )
    assert spec.steer[0].site == "mlp_out" and torch.equal(spec.steer[0].delta, -2 * torch.arange(8.0))
    assert spec.steer[1].site == "resid_post" and torch.equal(spec.steer[1].delta, torch.arange(8.0))
    assert spec.steer[1].positions == (0,)
    assert spec.ablate[0].heads == (1,) and spec.ablate[1].neurons == (0, 15)
    assert spec.changes_kv and spec.max_cached_prefix() == 0
    assert parse(capture={"layers": "all"}).capture.layers == (0, 1, 2, 3)
    assert parse(capture={"layers": [0], "positions": [3, 6]}).max_cached_prefix() == 3
    assert parse(capture={"layers": [0], "positions": "last"}).max_cached_prefix() is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"capture": {"layers": [4]}},
            "capture.layers: layer 4 is out of range; the model has 4 layers (0..3).",
        ),
        ({"capture": {"layers": [-1]}}, "layer -1 is out of range"),
        ({"capture": {"layers": []}}, "capture.layers must be a non-empty list"),
        (
            {"capture": {"layers": [0], "sites": ["q"]}},
            "capture.sites: unknown site 'q'; expected one of resid_pre",
        ),
        ({"capture": {"layers": [0], "format": "npy"}}, 'capture.format must be "base64" or "list"'),
        ({"capture": {"layers": [0], "top_k": 0}}, "capture.top_k must be an integer from 1"),
        (
            {"capture": {"layers": [0], "positions": [8]}},
            "position 8 is out of range; this request computes positions 0..7",
        ),
        (
            {"capture": {"layers": [0], "positions": "first"}},
            'capture.positions must be "all", "last" or a non-empty list',
        ),
        ({"capture": [1]}, "capture must be an object"),
        ({"steer": {"layer": 0}}, "steer must be a list of objects"),
        (
            {"steer": [{"layer": 0, "vector": [0.0] * 9}]},
            r"steer\[0\].vector has 9 values; the model's hidden size is 8",
        ),
        (
            {"steer": [{"layer": 0, "vector": base64.b64encode(b"1234").decode()}]},
            "has 4 bytes; base64 vectors are",
        ),
        ({"steer": [{"layer": 0, "vector": [float("nan")] * 8}]}, "not a finite float32"),
        ({"steer": [{"layer": 0, "vector": ["x"] * 8}]}, "must be a list of numbers or a base64 string"),
        (
            {"steer": [{"layer": 0, "vector": [0.0] * 8, "scale": "2"}]},
            r"steer\[0\].scale must be a finite number",
        ),
        (
            {"steer": [{"layer": 0, "vector": [0.0] * 8, "positions": "last"}]},
            r'steer\[0\].positions must be "all" or',
        ),
        ({"steer": [{"layer": 0, "vector": [0.0] * 8, "code": "x"}]}, r"Unknown key 'code' in steer\[0\]"),
        ({"steer": [{"layer": "0", "vector": [0.0] * 8}]}, "must be an integer layer number"),
        ({"ablate": [{"layer": 0, "heads": [0], "neurons": [0]}]}, 'either "heads" or "neurons"'),
        (
            {"ablate": [{"layer": 0, "heads": [2]}]},
            r"ablate\[0\].heads: 2 is out of range; layer 0 has 2 heads",
        ),
        ({"ablate": [{"layer": 1, "neurons": [0]}]}, "layer 1 has no dense MLP"),
        ({"ablate": [{"layer": 0, "neurons": []}]}, "must be a non-empty list of integers"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(
        RequestError, match=message.replace("(", r"\(").replace(")", r"\)").replace("..", r"\.\.")
    ):
        parse(**kwargs)


def test_capture_size_limit():
    args = ServerArgs(
        enable_interventions=True, intervention_max_capture_bytes=8 * 4 * 8
    )  # 8 rows of 8 floats
    ok = InterventionParser(args, SHAPE).parse(
        {"layers": [0, 1], "positions": [0, 1, 2, 3]}, None, None, False, 5, 4
    )
    assert ok.capture.layers == (0, 1)
    with pytest.raises(
        RequestError,
        match=r"up to 288 bytes \(3 positions x 3 layers x 1 sites\), over this server's limit of 256",
    ):
        InterventionParser(args, SHAPE).parse(
            {"layers": [0, 1, 2], "positions": [0, 1, 2]}, None, None, False, 5, 4
        )
    # "all": the 5 + 4 - 1 positions the request computes
    assert InterventionParser(args, SHAPE).parse({"layers": [0]}, None, None, False, 5, 4).capture is not None
    with pytest.raises(RequestError, match="up to 512 bytes"):
        InterventionParser(args, SHAPE).parse({"layers": [0, 1]}, None, None, False, 5, 4)


def test_per_item_values():
    steer_a = [{"layer": 0}]
    assert for_item([steer_a, None], list, 1, 2, "steer") is None
    assert for_item([steer_a, None], list, 0, 2, "steer") == steer_a
    assert for_item(steer_a, list, 1, 2, "steer") == steer_a  # a list of entries: for every prompt
    assert for_item({"layers": [0]}, dict, 1, 2, "capture") == {"layers": [0]}
    with pytest.raises(RequestError, match="steer has 1 entries for a batch of 2"):
        for_item([steer_a], list, 0, 2, "steer")
