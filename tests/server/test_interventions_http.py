"""/generate's capture / steer / ablate and return_hidden_states over real HTTP: off (400 naming
the flag) unless the server starts with --enable-interventions / --enable-return-hidden-states."""

from __future__ import annotations

import base64
import json

import numpy as np
import requests

GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
IDS = [101, 2045, 3999, 17, 42]


def post(server, body):
    return requests.post(server.base_url + "/generate", json=body, timeout=60)


def test_off_by_default(tiny_server_factory):
    server = tiny_server_factory()
    for field, flag in (
        ({"capture": {"layers": [0]}}, "--enable-interventions"),
        ({"steer": [{"layer": 0, "vector": [0.0] * 64}]}, "--enable-interventions"),
        ({"ablate": [{"layer": 0, "heads": [0]}]}, "--enable-interventions"),
        ({"return_hidden_states": True}, "--enable-return-hidden-states"),
    ):
        r = post(server, {"input_ids": IDS, "sampling_params": GREEDY, **field})
        assert r.status_code == 400 and flag in r.json()["error"]["message"]


def test_capture_steer_ablate(tiny_server_factory):
    server = tiny_server_factory(["--enable-interventions", "--enable-return-hidden-states"])
    plain = post(server, {"input_ids": IDS, "sampling_params": GREEDY}).json()
    cap = post(
        server,
        {"input_ids": IDS, "sampling_params": GREEDY, "capture": {"layers": [1], "sites": ["resid_post"]}},
    ).json()
    (entry,) = cap["meta_info"]["captured"]
    assert entry["layer"] == 1 and entry["site"] == "resid_post" and entry["dtype"] == "float32"
    assert entry["shape"] == [len(IDS) + 3, 64] and entry["positions"] == list(range(len(IDS) + 3))
    data = np.frombuffer(base64.b64decode(entry["data"]), dtype="<f4").reshape(entry["shape"])
    assert np.isfinite(data).all() and np.abs(data).max() > 0
    assert cap["output_ids"] == plain["output_ids"]
    vector = base64.b64encode((np.ones(64, dtype="<f4") * 20).tobytes()).decode()
    steered = post(
        server,
        {
            "input_ids": IDS,
            "sampling_params": GREEDY,
            "steer": [{"layer": 1, "site": "mlp_out", "vector": vector}],
        },
    ).json()
    assert steered["output_ids"] != plain["output_ids"]
    ablated = post(
        server,
        {"input_ids": IDS, "sampling_params": GREEDY, "ablate": [{"layer": 0, "neurons": list(range(128))}]},
    ).json()
    assert len(ablated["output_ids"]) == 4
    hs = post(server, {"input_ids": IDS, "sampling_params": GREEDY, "return_hidden_states": True}).json()
    assert np.asarray(hs["meta_info"]["hidden_states"][0]).shape == (len(IDS), 64)
    # streaming: the captured activations come with the last event
    r = requests.post(
        server.base_url + "/generate",
        json={
            "input_ids": IDS,
            "sampling_params": GREEDY,
            "stream": True,
            "capture": {"layers": [0], "positions": "last"},
        },
        stream=True,
        timeout=60,
    )
    events = [
        json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line and line != "data: [DONE]"
    ]
    assert "captured" not in events[0]["meta_info"]
    assert events[-1]["meta_info"]["captured"][0]["positions"] == [len(IDS) + 2]
    info = server.wait_idle_and_whole()
    assert info["enable_interventions"] is True


def test_invalid_fields_are_400(tiny_server_factory):
    server = tiny_server_factory(["--enable-interventions", "--intervention-max-capture-bytes", "1024"])
    for field, message in (
        ({"capture": "layer 10"}, "Field 'capture' must be an object or a list of objects"),
        ({"steer": {"layer": 0}}, "Field 'steer' must be a list"),
        ({"capture": {"layers": [10]}}, "layer 10 is out of range; the model has 2 layers"),
        ({"capture": {"layers": [0], "sites": ["resid"]}}, "unknown site 'resid'"),
        ({"steer": [{"layer": 0, "vector": [1.0, 2.0]}]}, "has 2 values; the model's hidden size is 64"),
        ({"capture": {"layers": [0, 1]}}, "over this server's limit of 1024 bytes"),
    ):
        r = post(server, {"input_ids": IDS, "sampling_params": GREEDY, **field})
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"]
