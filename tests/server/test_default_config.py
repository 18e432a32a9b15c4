"""The default configuration, as `make serve` runs it (torch.compile on, compiled in the background),
one server per architecture family: dense, MoE, embedding and reward. Each generation server is
asked until both decode graphs run compiled, then its greedy output must be transformers' (float32);
the MoE server also records its expert distribution with the compiled step in place."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from server_harness import start_server, stop_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import hf_greedy, make_tiny_checkpoint  # noqa: E402

DEFAULT_ARGS = ["--dtype", "float32", "--max-total-tokens", "20000", "--random-seed", "0"]
PROMPTS = [[5, 17, 300, 42, 9, 77], [100, 200, 300], [7] * 12]
NEW = 12


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    started = []

    def start(model: Path, *extra: str, cwd: Path | None = None):
        log = tmp_path_factory.mktemp("default_server") / "server.log"
        server = start_server(["--model-path", str(model), *DEFAULT_ARGS, *extra], log, cwd=cwd)
        started.append(server)
        return server

    yield start
    for s in started:
        stop_server(s)


def post(server, path, body=None):
    return requests.post(server.base_url + path, json=body, timeout=120)


def wait_compiled(server, timeout: float = 600.0) -> dict:
    """/get_server_info once both decode shape families run compiled (it fails on a compile error:
    the family then never opens and the log says why)."""
    deadline = time.monotonic() + timeout
    while True:
        info = requests.get(server.base_url + "/get_server_info", timeout=30).json()
        if info["compiled_decode"] == ["1", "2+"]:
            return info
        assert "Compiling the decode step failed" not in server.log(), server.log()
        assert time.monotonic() < deadline, f"not compiled after {timeout}s:\n{server.log()}"
        time.sleep(1)


def assert_greedy_matches_transformers(server, path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    want = [hf_greedy(ref, p, NEW) for p in PROMPTS]
    sp = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}
    alone = [post(server, "/generate", {"input_ids": p, "sampling_params": sp}).json() for p in PROMPTS]
    assert [o["output_ids"] for o in alone] == want  # batch 1: the first graph
    batch = post(server, "/generate", {"input_ids": PROMPTS, "sampling_params": sp}).json()
    assert [o["output_ids"] for o in batch] == want  # batch 3: the batch 2+ graph
    assert server.wait_idle_and_whole()["kv_pool_whole"] is True


def test_dense_compiled(serve, tmp_path):
    path = make_tiny_checkpoint("Qwen3ForCausalLM", tmp_path / "dense")
    server = serve(path, "--skip-tokenizer-init")
    info = wait_compiled(server)
    assert info["enable_torch_compile"] is True
    assert_greedy_matches_transformers(server, path)


def test_moe_compiled_with_expert_distribution(serve, tmp_path):
    """The Qwen2-MoE start-up crash of issue 11: compiling the decode step used to fail on the
    grouped dispatch's data-dependent `.tolist()`."""
    path = make_tiny_checkpoint("Qwen2MoeForCausalLM", tmp_path / "moe")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    server = serve(path, "--skip-tokenizer-init", cwd=cwd)
    wait_compiled(server)
    assert_greedy_matches_transformers(server, path)
    assert post(server, "/flush_cache").status_code == 200  # count every prompt token (no cache hit)
    assert post(server, "/start_expert_distribution_record").status_code == 200
    sp = {"max_new_tokens": 4, "ignore_eos": True, "temperature": 0}
    assert post(server, "/generate", {"input_ids": [5, 6, 7, 8], "sampling_params": sp}).status_code == 200
    assert post(server, "/stop_expert_distribution_record").status_code == 200
    assert post(server, "/dump_expert_distribution_record").status_code == 200
    (dump,) = cwd.glob("expert_distribution_rank0_timestamp*.csv")
    rows = list(csv.reader(dump.open()))[1:]
    for layer in (0, 1):  # 4 prompt tokens + 3 decoded, top-2 of 4 experts
        assert sum(int(r[2]) for r in rows if r[0] == str(layer)) == 7 * 2
    assert server.wait_idle_and_whole()["kv_pool_whole"] is True


def test_embedding_default(serve):
    """all-MiniLM-L6-v2 (the real checkpoint) served with no flags but the dtype."""
    from tests.models.test_embedding_models import TEXTS, _reference_sentence_embeddings, minilm_dir

    server = serve(minilm_dir())
    out = post(server, "/v1/embeddings", {"model": "m", "input": TEXTS}).json()
    got = torch.tensor([d["embedding"] for d in out["data"]])
    torch.testing.assert_close(
        got, _reference_sentence_embeddings(minilm_dir(), TEXTS, "mean"), atol=1e-5, rtol=0
    )


def test_reward_default(serve, tmp_path, smollm_tokenizer_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.for_model(
        "qwen2", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = AutoModelForSequenceClassification.from_config(config).eval()
    ref.save_pretrained(tmp_path / "rm")
    for f in Path(smollm_tokenizer_dir).iterdir():
        if f.is_file():
            (tmp_path / "rm" / f.name).write_bytes(f.read_bytes())
    server = serve(tmp_path / "rm")
    texts = ["<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>user\nTell me a joke<|im_end|>\n"]
    scores = [s["embedding"][0] for s in post(server, "/classify", {"text": texts}).json()]
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        want = [float(ref(**tok(t, return_tensors="pt")).logits[0, 0]) for t in texts]
    assert scores == pytest.approx(want, abs=1e-4)
