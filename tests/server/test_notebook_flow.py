"""SGLang's "Native APIs" notebook (docs/seeds), run against research_rt on the default model with
only the import and the launch command changed."""

from __future__ import annotations

import sys

import pytest
import requests
from server_harness import REPO_ROOT, server_env

from research_rt.utils import launch_server_cmd, print_highlight, terminate_process, wait_for_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def notebook_server(monkeypatch_module):
    server_process, port = launch_server_cmd(f"{sys.executable} -m research_rt.launch_server --host 0.0.0.0")
    try:
        wait_for_server(f"http://localhost:{port}", timeout=300)
        yield port
    finally:
        terminate_process(server_process)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    for k, v in server_env().items():
        mp.setenv(k, v)
    mp.chdir(REPO_ROOT)
    yield mp
    mp.undo()


def test_native_api_notebook(notebook_server, capsys):
    port = notebook_server
    url = f"http://localhost:{port}/generate"
    response = requests.post(url, json={"text": "What is the capital of France?"})
    print_highlight(response.json())
    assert response.status_code == 200 and response.json()["meta_info"]["completion_tokens"] > 0

    greedy = requests.post(
        url,
        json={
            "text": "The capital of France is",
            "sampling_params": {"temperature": 0, "max_new_tokens": 16},
        },
    ).json()
    assert "Paris" in greedy["text"]  # the real SmolLM2 weights, not random ones

    response_json = requests.get(f"http://localhost:{port}/get_model_info").json()
    model_path = response_json["model_path"]
    assert model_path.endswith(".gguf") and "smollm2" in model_path.lower()
    assert response_json["is_generation"] is True and response_json["tokenizer_path"] == model_path
    assert response_json.keys() == {"model_path", "is_generation", "tokenizer_path"}

    info = requests.get(f"http://localhost:{port}/get_server_info")
    assert info.status_code == 200 and info.json()["model_path"] == model_path

    assert requests.get(f"http://localhost:{port}/health_generate").status_code == 200
    assert requests.get(f"http://localhost:{port}/health").status_code == 200

    response = requests.post(f"http://localhost:{port}/flush_cache")
    assert response.text == (
        "Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
        "requests, the operation will not be performed.)\n"
    )

    response = requests.post(
        f"http://localhost:{port}/update_weights_from_disk", json={"model_path": model_path}
    )
    assert response.json()["success"] is True
    assert response.json()["message"] == "Succeeded to update model weights."
    again = requests.post(
        url,
        json={
            "text": "The capital of France is",
            "sampling_params": {"temperature": 0, "max_new_tokens": 16},
        },
    ).json()
    assert again["text"] == greedy["text"]

    response = requests.post(
        f"http://localhost:{port}/update_weights_from_disk",
        json={"model_path": "HuggingFaceTB/SmolLM2-135M-Instruct-wrong"},
    )
    response_json = response.json()
    assert response_json["success"] is False
    assert response_json["message"] == (
        "Failed to get weights iterator: HuggingFaceTB/SmolLM2-135M-Instruct-wrong (repository not found)."
    )

    r = requests.post(
        f"http://localhost:{port}/encode", json={"model": model_path, "text": "Once upon a time"}
    )
    assert r.status_code == 400 and "--is-embedding" in r.json()["error"]["message"]

    chat = requests.post(
        f"http://localhost:{port}/v1/chat/completions",
        json={
            "model": model_path,
            "temperature": 0,
            "max_tokens": 24,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        },
    )
    assert "Paris" in chat.json()["choices"][0]["message"]["content"]
    assert "\033[1;34m" in capsys.readouterr().out  # print_highlight
