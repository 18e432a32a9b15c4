"""/update_weights_from_disk: swap to other weights and back; a wrong repo id fails cleanly."""

from __future__ import annotations

import pytest
import requests

PROMPT = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 16}}


@pytest.fixture(scope="module")
def server(tiny_server_factory):
    return tiny_server_factory()


def gen(server) -> list[int]:
    return requests.post(server.base_url + "/generate", json=PROMPT).json()["output_ids"]


def model_path(server) -> str:
    return requests.get(server.base_url + "/get_model_info").json()["model_path"]


def test_update_and_back(server, tiny_dir, tiny_dir_b):
    base = gen(server)
    assert model_path(server) == str(tiny_dir)
    r = requests.post(server.base_url + "/update_weights_from_disk", json={"model_path": str(tiny_dir_b)})
    assert r.status_code == 200
    assert r.json() == {
        "success": True,
        "message": "Succeeded to update model weights.",
        "num_paused_requests": 0,
    }
    assert model_path(server) == str(tiny_dir_b)
    assert requests.get(server.base_url + "/v1/models").json()["data"][0]["id"] == str(tiny_dir_b)
    assert requests.get(server.base_url + "/get_model_info").json()["tokenizer_path"] == str(tiny_dir)
    assert gen(server) != base
    info = requests.get(server.base_url + "/get_server_info").json()
    assert info["model_path"] == str(tiny_dir_b) and info["kv_pool_whole"] is True
    r = requests.post(
        server.base_url + "/update_weights", json={"model_path": str(tiny_dir), "load_format": None}
    )
    assert r.status_code == 200 and r.json()["success"] is True
    assert model_path(server) == str(tiny_dir) and gen(server) == base
    assert "Start update_weights. Load format=auto" in server.log()


def test_update_failures(server, tiny_dir, tmp_path):
    base = gen(server)
    r = requests.post(
        server.base_url + "/update_weights_from_disk", json={"model_path": "meta-llama/Llama-3.2-1B-wrong"}
    )
    assert r.status_code == 400
    assert r.json() == {
        "success": False,
        "message": "Failed to get weights iterator: meta-llama/Llama-3.2-1B-wrong (repository not found).",
        "num_paused_requests": 0,
    }
    r = requests.post(
        server.base_url + "/update_weights_from_disk",
        json={"model_path": str(tiny_dir), "load_format": "bitsandbytes"},
    )
    assert r.status_code == 400 and r.json()["message"] == "Failed to get model loader: bitsandbytes."
    assert model_path(server) == str(tiny_dir) and gen(server) == base


def test_update_with_wrong_shapes_rolls_back(server, tiny_dir, tmp_path):
    """A checkpoint whose tensors do not fit fails mid-way: the old weights come back."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    names = sorted(tensors)
    for i, name in enumerate(names):  # perturb early tensors (they load), break a late one
        tensors[name] = tensors[name] + 1.0 if i < len(names) - 1 else torch.zeros(3, 3)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    base = gen(server)
    r = requests.post(server.base_url + "/update_weights_from_disk", json={"model_path": str(bad)})
    assert r.status_code == 400 and r.json()["success"] is False
    assert r.json()["message"].startswith("Failed to update weights: ")
    assert r.json()["message"].endswith(".\nRolling back to original weights.")
    assert model_path(server) == str(tiny_dir) and gen(server) == base
