"""Data parallelism: `launch_server --dp-size 2` = two research_rt servers behind the real sglang-router
binary, everything on loopback. Routed requests must answer exactly as one server does; the router's
cache-aware policy must keep a shared prefix on one worker; flush fans out; abort and weight updates
reach every worker through research_rt.utils; a killed worker drops out while requests keep
succeeding; one Ctrl-C stops everything. The tests run in file order (the last ones are destructive).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests
from server_harness import (
    EAGER,
    REPO_ROOT,
    TINY_ARGS,
    Server,
    free_port,
    server_env,
    start_server,
    stop_server,
)

from research_rt.utils import abort_request_all, list_workers, update_weights_from_disk_all

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "max_new_tokens": 12}
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def fibonacci(n):"]
# the router's rebuilt /generate body (measured against a logging fake worker)
ROUTER_GENERATE_EXTRAS = {
    "model": None,
    "return_text_in_logprobs": False,
    "stream": False,
    "log_metrics": True,
    "return_hidden_states": False,
    "background": False,
    "no_logs": False,
    "return_bytes": False,
    "return_entropy": False,
}
ROUTER_CHAT_EXTRAS = {
    "logprobs": False,
    "stream": False,
    "no_stop_trim": False,
    "ignore_eos": False,
    "continue_final_message": False,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
}


def start_dp(tiny_dir, tmp_path_factory) -> Server:
    log = tmp_path_factory.mktemp("dp") / "dp.log"
    return start_server(["--dp-size", "2", "--model-path", str(tiny_dir), *TINY_ARGS], log, timeout=300)


@pytest.fixture(scope="module")
def dp(tiny_dir, tmp_path_factory):
    server = start_dp(tiny_dir, tmp_path_factory)
    yield server
    if server.process.poll() is None:
        stop_server(server)


@pytest.fixture(scope="module")
def single(tiny_server_factory):
    return tiny_server_factory()


def workers(dp: Server) -> list[str]:
    return list_workers(dp.base_url)


def worker_processes(dp: Server) -> dict[str, psutil.Process]:
    """url -> the worker process (the launcher's children running launch_server)."""
    out = {}
    for p in psutil.Process(dp.process.pid).children():
        cmd = p.cmdline()
        if "research_rt.launch_server" in cmd:
            out[f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"] = p
    return out


def gen(base: str, body: dict, **kw) -> requests.Response:
    return requests.post(base + "/generate", json=body, timeout=120, **kw)


def test_workers_registered_and_pinned(dp):
    urls = workers(dp)
    procs = worker_processes(dp)
    assert len(urls) == 2 and set(urls) == set(procs)
    assert all(u.startswith("http://127.0.0.1:") for u in urls)  # loopback only
    names, cpus = set(), []
    for url, proc in procs.items():
        assert requests.get(url + "/health", timeout=5).status_code == 200
        info = requests.get(url + "/server_info", timeout=30).json()
        assert set(info) == set(requests.get(url + "/get_server_info", timeout=30).json())
        assert (info["tp_size"], info["dp_size"]) == (1, 1)
        names.add(info["served_model_name"])
        model = requests.get(url + "/model_info", timeout=5).json()
        assert model["model_type"] == "llama" and model["architectures"] == ["LlamaForCausalLM"]
        assert model["is_generation"] is True
        load = requests.get(url + "/get_load", timeout=5).json()
        assert isinstance(load, list) and len(load) == 1
        assert {"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"} <= set(load[0])
        affinity = proc.cpu_affinity()
        assert proc.environ()["OMP_NUM_THREADS"] == str(len(affinity))
        cpus.append(set(affinity))
    assert len(names) == 1  # the router requires one served_model_name
    available = len(os.sched_getaffinity(0))
    if available >= 2:  # disjoint halves of this machine's CPUs
        assert not cpus[0] & cpus[1] and len(cpus[0] | cpus[1]) == available


def test_routed_generate_matches_one_server(dp, single):
    for prompt in PROMPTS:
        body = {"text": prompt, "sampling_params": GREEDY}
        routed, ref = gen(dp.base_url, body), gen(single.base_url, body)
        assert routed.status_code == 200, routed.text
        assert routed.json()["output_ids"] == ref.json()["output_ids"]
        assert routed.json()["text"] == ref.json()["text"]
    body = {"model": "x", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
    routed = requests.post(dp.base_url + "/v1/completions", json=body, timeout=60)
    ref = requests.post(single.base_url + "/v1/completions", json=body, timeout=60)
    assert routed.status_code == 200, routed.text
    assert routed.json()["choices"][0]["text"] == ref.json()["choices"][0]["text"]


def read_sse(resp) -> list:
    events = []
    for raw in resp.iter_lines():
        line = raw.decode("utf-8")
        if not line:
            continue
        assert line.startswith("data: "), line
        if line == "data: [DONE]":
            return events
        events.append(json.loads(line[len("data: ") :]))
    raise AssertionError("stream ended without data: [DONE]")


def test_routed_stream_matches_one_server(dp, single):
    body = {"text": PROMPTS[1], "sampling_params": GREEDY, "stream": True}
    with gen(dp.base_url, body, stream=True) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        routed = read_sse(r)
    with gen(single.base_url, body, stream=True) as r:
        ref = read_sse(r)
    assert [e["text"] for e in routed] == [e["text"] for e in ref]
    assert routed[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 12}


def test_routed_chat_matches_one_server(dp, single):
    # the router renames max_tokens to max_completion_tokens and adds its own fields
    body = {
        "model": "x",
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 10,
        "temperature": 0,
    }
    routed = requests.post(dp.base_url + "/v1/chat/completions", json=body, timeout=60)
    ref = requests.post(single.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert routed.status_code == 200, routed.text
    assert routed.json()["choices"][0]["message"] == ref.json()["choices"][0]["message"]
    assert routed.json()["usage"]["completion_tokens"] == 10
    body["stream"] = True
    with requests.post(dp.base_url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        chunks = read_sse(r)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text == ref.json()["choices"][0]["message"]["content"]


def test_worker_accepts_the_router_rebuilt_bodies(dp, single):
    """Sent straight to a worker, as the router sends them: every extra field accepted."""
    url = workers(dp)[0]
    body = {"text": PROMPTS[0], "sampling_params": GREEDY, **ROUTER_GENERATE_EXTRAS}
    r = gen(url, body)
    assert r.status_code == 200, r.text
    assert (
        r.json()["output_ids"]
        == gen(single.base_url, {"text": PROMPTS[0], "sampling_params": GREEDY}).json()["output_ids"]
    )
    chat = {
        "model": "x",
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_completion_tokens": 10,
        "temperature": 0,
        **ROUTER_CHAT_EXTRAS,
    }
    r = requests.post(url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 10


def cached_tokens_by_worker(dp: Server) -> dict[str, int]:
    return {
        u: requests.get(u + "/get_server_info", timeout=30).json()["num_cached_tokens"] for u in workers(dp)
    }


def test_flush_cache_fans_out(dp):
    for prompt in PROMPTS:
        gen(dp.base_url, {"text": prompt * 3, "sampling_params": GREEDY})
    assert sum(cached_tokens_by_worker(dp).values()) > 0
    r = requests.post(dp.base_url + "/flush_cache", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["workers_flushed"] == 2
    assert cached_tokens_by_worker(dp) == dict.fromkeys(workers(dp), 0)


def test_shared_prefix_lands_on_one_worker(dp):
    assert requests.post(dp.base_url + "/flush_cache", timeout=30).status_code == 200
    prefix = "You are a careful assistant. " + " ".join(
        f"Rule {i}: answer briefly and politely." for i in range(40)
    )
    metas = []
    for q in ("What is two plus two?", "Name a colour.", "Say hello.", "Count to three.", "Spell cat."):
        r = gen(
            dp.base_url,
            {"text": f"{prefix}\nQuestion: {q}", "sampling_params": {"temperature": 0, "max_new_tokens": 2}},
        )
        assert r.status_code == 200, r.text
        metas.append(r.json()["meta_info"])
    prefix_len = metas[0]["prompt_tokens"] - 12  # the question is a dozen tokens at most
    assert prefix_len > 200 and metas[0]["cached_tokens"] == 0
    for meta in metas[1:]:  # each later request reused the prefix's KV: it went to the same worker
        assert meta["cached_tokens"] >= prefix_len, metas
    cached = sorted(cached_tokens_by_worker(dp).values())
    assert cached[0] == 0 and cached[1] >= prefix_len  # the other worker never saw it


def test_abort_broadcast(dp):
    result = {}

    def run():
        body = {
            "text": "abort me",
            "rid": "dp-abort",
            "sampling_params": {"max_new_tokens": 7000, "ignore_eos": True},
        }
        result["r"] = gen(dp.base_url, body)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while not any(requests.get(u + "/get_load", timeout=5).json()[0]["num_reqs"] for u in workers(dp)):
        assert time.monotonic() < deadline, "the long request never started"
        time.sleep(0.05)
    answers = abort_request_all(dp.base_url, rid="dp-abort")
    assert [status for _, status, _ in answers] == [200, 200]
    t.join(30)
    assert not t.is_alive()
    meta = result["r"].json()["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 7000


def test_update_weights_broadcast(dp, tiny_dir, tiny_dir_b):
    body = {"text": PROMPTS[0], "sampling_params": GREEDY}
    before = gen(dp.base_url, body).json()["output_ids"]
    answers = update_weights_from_disk_all(str(tiny_dir_b), router_url=dp.base_url)
    assert len(answers) == 2 and all(a["success"] for a in answers), answers
    for url in workers(dp):
        assert requests.get(url + "/get_model_info", timeout=5).json()["model_path"] == str(tiny_dir_b)
    # both workers now answer with the new weights, whichever the router picks
    outs = {tuple(gen(u, body).json()["output_ids"]) for u in workers(dp)}
    assert len(outs) == 1 and list(outs.pop()) != before
    assert gen(dp.base_url, body).json()["output_ids"] != before
    answers = update_weights_from_disk_all(str(tiny_dir), worker_urls=workers(dp))
    assert all(a["success"] for a in answers), answers
    assert gen(dp.base_url, body).json()["output_ids"] == before


def test_killed_worker_is_dropped_and_requests_succeed(dp):
    victim_url, victim = sorted(worker_processes(dp).items())[1]
    survivor = next(u for u in workers(dp) if u != victim_url)
    stop = threading.Event()
    before, after = [], []

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            body = {
                "text": f"Client {i} request {n}: tell me a story",
                "sampling_params": {"temperature": 0, "max_new_tokens": 16},
            }
            t = time.monotonic()
            try:
                r = gen(dp.base_url, body)
                code = r.status_code if r.status_code == 200 else (r.status_code, r.text[:300])
            except requests.RequestException as e:
                code = repr(e)
            (after if t > killed_at[0] else before).append(code)
            n += 1

    killed_at = [float("inf")]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    killed_at[0] = time.monotonic()
    victim.kill()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(60)
    assert before and all(c == 200 for c in before), [c for c in before if c != 200]
    assert len(after) >= 4 and all(c == 200 for c in after), [c for c in after if c != 200]
    assert workers(dp) == [survivor]  # the router no longer sends to the dead worker
    log = dp.log()
    assert re.search(rf"DP worker \d \({re.escape(victim_url)}, pid {victim.pid}\) exited with code -9", log)
    assert dp.process.poll() is None  # the data-parallel server keeps serving
    r = gen(dp.base_url, {"text": PROMPTS[0], "sampling_params": GREEDY})
    assert r.status_code == 200


def test_ctrl_c_stops_router_and_workers(dp):
    children = psutil.Process(dp.process.pid).children(recursive=True)
    assert children
    dp.process.send_signal(signal.SIGINT)
    assert dp.process.wait(timeout=60) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive
    assert "Stopping the router and 1 DP worker(s)." in dp.log()


def test_compiled_workers_and_health_503_while_starting(tiny_dir, tmp_path_factory, single):
    """The default (torch.compile on): each worker's /health says 503 until its warm-up (which
    compiles) is done, then the routed output matches the eager single server's."""
    log = tmp_path_factory.mktemp("dp_compiled") / "dp.log"
    port = free_port()
    env = server_env()
    default_args = [a for a in TINY_ARGS if a != EAGER]  # compile on, as make serve runs
    args = ["--dp-size", "2", "--port", str(port), "--model-path", str(tiny_dir), *default_args]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "research_rt.launch_server", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        statuses: dict[str, list[int]] = {}
        deadline = time.monotonic() + 600
        while "The server is fired up and ready to roll!" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            for url in re.findall(r"DP worker \d: pid \d+, (http://127\.0\.0\.1:\d+)", log.read_text()):
                try:
                    code = requests.get(url + "/health", timeout=5).status_code
                except requests.RequestException:
                    continue
                if not statuses.get(url) or statuses[url][-1] != code:
                    statuses.setdefault(url, []).append(code)
            time.sleep(0.1)
        # every worker ends ready and answers nothing but 503 before (the warm-up window is short, so
        # a poll may miss it: tests/server/test_health_ready.py checks the 503 itself)
        assert len(statuses) == 2 and all(s[-1] == 200 and set(s[:-1]) <= {503} for s in statuses.values())
        assert len(re.findall(r"\[dp\d\] .*enable_torch_compile=True", log.read_text())) == 2
        base = f"http://127.0.0.1:{port}"
        for prompt in PROMPTS[:2]:
            body = {"text": prompt, "sampling_params": GREEDY}
            assert gen(base, body).json()["output_ids"] == gen(single.base_url, body).json()["output_ids"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


SLOW_STEP_SRC = """
import time
from research_rt.sampling.custom_logit_processor import CustomLogitProcessor

class SlowStep(CustomLogitProcessor):
    def __call__(self, logits, custom_param_list=None):
        time.sleep(0.01)
        return logits
"""


def test_health_503_while_draining_on_sigterm(tiny_server_factory):
    """SIGTERM: /health answers 503 at once (a router stops sending here); a short running request
    finishes normally, one still running after the drain time is aborted; then a clean exit."""
    from research_rt.launch_server import SHUTDOWN_DRAIN_S

    # Each step sleeps 10 ms in a logit processor, so 7000 tokens take over 70 s on any machine (the
    # tiny model alone decodes 700+ tokens/s here, which finished the long request within the drain).
    server = tiny_server_factory(["--enable-custom-logit-processor"])
    ns: dict = {"__name__": "__main__"}  # dill pickles a class of __main__ by value
    exec(SLOW_STEP_SRC, ns)  # noqa: S102 - test fixture code
    slow = ns["SlowStep"].to_str()
    results = {}

    def run(name: str, n: int) -> None:
        sp = {"max_new_tokens": n, "ignore_eos": True}
        body = {"text": f"drain {name}", "sampling_params": sp, "custom_logit_processor": slow}
        results[name] = gen(server.base_url, body).json()["meta_info"]

    threads = [threading.Thread(target=run, args=a) for a in (("short", 24), ("long", 7000))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while requests.get(server.base_url + "/get_load", timeout=5).json()[0]["num_running_reqs"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert requests.get(server.base_url + "/health", timeout=5).status_code == 503
    assert requests.get(server.base_url + "/health_generate", timeout=5).status_code == 503
    for t in threads:
        t.join(60)
    assert server.process.wait(timeout=30) == 0
    assert SHUTDOWN_DRAIN_S <= time.monotonic() - t0 < SHUTDOWN_DRAIN_S + 10
    assert results["short"]["finish_reason"] == {"type": "length", "length": 24}
    assert results["long"]["finish_reason"]["type"] == "abort"
    assert results["long"]["completion_tokens"] < 7000
    assert "Shutting down: /health answers 503" in server.log()
