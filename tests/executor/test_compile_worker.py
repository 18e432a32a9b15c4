"""The background compile (graph_runner.py, compile_process.py, module_call_lock.py): the child
fills the compile caches, the in-process compile then serves the same greedy tokens, eager steps
that run meanwhile are not broken by Inductor's tracing, and an orphaned child ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import torch

from research_rt.executor.module_call_lock import MODULE_CALLS, inductor_under_lock
from tests.conftest import eager_engine

GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
PROMPTS = ["The capital of France is", "Once upon a time"]


def test_background_compile_serves_meanwhile_and_matches(tiny_llama_dir):
    """Requests sent while the child compiles and the parent switches all finish, with the eager
    greedy tokens; afterwards both shape families run compiled. (The session's Inductor cache: a
    process caches its cache directory, so a test cannot point parent and child elsewhere.)"""
    with eager_engine(str(tiny_llama_dir), dtype="float32", max_total_tokens=2048) as engine:
        ref = [o["output_ids"] for o in engine.generate(PROMPTS, GREEDY)]
    import research_rt

    with research_rt.Engine(str(tiny_llama_dir), dtype="float32", max_total_tokens=2048) as engine:
        served = 0
        deadline = time.monotonic() + 600
        while engine.compiled_decode() != ["1", "2+"]:
            assert time.monotonic() < deadline, "the background compile did not finish"
            outs = engine.generate(PROMPTS, GREEDY)
            assert [o["output_ids"] for o in outs] == ref
            served += 1
        assert served >= 1
        assert [o["output_ids"] for o in engine.generate(PROMPTS, GREEDY)] == ref
        assert [o["output_ids"] for o in engine.generate(PROMPTS[:1], GREEDY)] == ref[:1]


def test_inductor_backend_holds_the_module_call_lock(monkeypatch):
    """While Inductor lowers a graph, this thread holds MODULE_CALLS and no other thread can take it
    (the scheduler's step waits rather than run a module through torch.fx's patched __call__); it
    is released afterwards. Ownership is checked, not a try-acquire from outside: the session's
    engines take the lock every 50 ms while idle, so a try-acquire raced with them (a CI failure)."""
    import torch._inductor.compile_fx as cfx

    real = cfx.compile_fx
    seen: list[tuple[bool, bool]] = []

    def other_thread_gets_it() -> bool:
        result: list[bool] = []

        def probe() -> None:
            got = MODULE_CALLS._lock.acquire(timeout=0)
            if got:
                MODULE_CALLS._lock.release()
            result.append(got)

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        return result[0]

    def spying_compile_fx(gm, inputs, **kwargs):
        seen.append((MODULE_CALLS._held_here(), other_thread_gets_it()))
        return real(gm, inputs, **kwargs)

    assert not MODULE_CALLS._held_here()
    monkeypatch.setattr(cfx, "compile_fx", spying_compile_fx)
    f = torch.compile(lambda x: torch.nn.functional.relu(x) * 2, backend=inductor_under_lock, fullgraph=True)
    assert torch.equal(f(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 4.0]))
    assert seen == [(True, False)]
    assert not MODULE_CALLS._held_here()  # released afterwards


def test_compile_worker_exits_with_its_parent(tmp_path):
    """A child whose parent is killed ends instead of compiling on as an orphan."""
    code = (
        "import os, subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', "
        "'from research_rt.executor.compile_worker import exit_with_parent; import sys, time; "
        "exit_with_parent(int(sys.argv[1])); time.sleep(60)', str(os.getpid())])\n"
        "print(p.pid, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
                    return
        except FileNotFoundError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the orphaned compile worker kept running")


def test_priority_holder_is_served_before_a_busy_loop():
    """A thread that takes MODULE_CALLS in a tight loop (the scheduler) lets a priority holder (a
    compile backend) in at its next iteration."""
    stop = threading.Event()
    iterations = [0]

    def busy() -> None:
        while not stop.is_set():
            with MODULE_CALLS:
                iterations[0] += 1
                sum(range(20000))  # Python work holding the GIL, as a scheduler step does

    t = threading.Thread(target=busy)
    t.start()
    try:
        time.sleep(0.05)
        t0 = time.monotonic()
        for _ in range(5):
            with MODULE_CALLS.priority():
                with MODULE_CALLS.priority():  # reentrant
                    pass
        assert time.monotonic() - t0 < 1.0
        assert iterations[0] > 0
    finally:
        stop.set()
        t.join()
