"""The prefix cache and interventions, on the fake runner: a request that steers or ablates neither
matches nor inserts (also when chunked or retracted); one that captures matches up to its first
captured position and shares its KV."""

from __future__ import annotations

import pytest
import torch

from research_rt.core.interventions import CaptureSpec, CaptureStore, InterventionSpec, SteerSpec
from research_rt.core.messages import AddReq
from research_rt.core.req import Req
from tests.scheduler.test_scheduler import (
    cached_slots,
    check_idle,
    check_invariants,
    finished,
    make_req,
    make_scheduler,
    prompt,
    reference,
    run,
)

STEER = InterventionSpec(steer=(SteerSpec(0, "resid_post", torch.zeros(1)),))


def with_spec(req: Req, spec: InterventionSpec) -> Req:
    req.interventions, req.captured = spec, CaptureStore()
    return req


def test_steered_request_neither_matches_nor_inserts():
    sched, runner, outputs = make_scheduler()
    p = prompt(60, 12)
    sched.inbox.put(AddReq(make_req("plain", p, max_new=5)))
    run(sched)
    cached = len(cached_slots(sched.cache.tree))
    assert cached == 12 + 4
    n_before = len(runner.batches)
    sched.inbox.put(AddReq(with_spec(make_req("steered", p, max_new=5), STEER)))
    run(sched)
    _, items = runner.batches[n_before]
    assert items == [("steered", 0, 12, 12)]  # the whole prompt computed, nothing reused
    assert len(cached_slots(sched.cache.tree)) == cached  # and nothing of it inserted
    sched.cache.reset()
    sched.inbox.put(AddReq(with_spec(make_req("steered2", p, max_new=5), STEER)))
    run(sched)
    assert cached_slots(sched.cache.tree) == []
    sched.inbox.put(AddReq(make_req("plain2", p, max_new=5)))
    run(sched)
    done = finished(outputs)
    assert (
        done["steered"].cached_tokens == done["steered2"].cached_tokens == done["plain2"].cached_tokens == 0
    )
    assert (
        done["plain2"].output_ids == done["steered2"].output_ids == reference(p, 5)
    )  # the fake ignores steering


@pytest.mark.parametrize("pool_size", [4096, 56])
def test_steered_requests_chunked_and_retracted(pool_size):
    """Chunked prefill (8 tokens a step) and, in the small pool, retraction: the steered
    requests' slots are freed, never cached; plain ones are cached as usual (run() checks the pool)."""
    sched, runner, outputs = make_scheduler(pool_size=pool_size, chunked_prefill_size=8)
    prompts = {f"r{i}": prompt(70 + i, 10 + i) for i in range(4)}
    reqs = {}
    for i, (rid, p) in enumerate(prompts.items()):
        req = make_req(rid, p, max_new=20)
        reqs[rid] = with_spec(req, STEER) if i % 2 == 0 else req
        sched.inbox.put(AddReq(reqs[rid]))
    while sched.step():
        check_invariants(sched)
        tree_tokens = {int(s) for s in cached_slots(sched.cache.tree)}
        for rid in ("r0", "r2"):
            r = reqs[rid]
            if r.req_pool_row >= 0:
                own = set(sched.cache.req_to_token.table[r.req_pool_row, : r.kv_len].tolist())
                assert not own & tree_tokens, "a steered request's KV is in the prefix cache"
    done = finished(outputs)
    if pool_size == 56:
        assert any(r.is_retracted for r in reqs.values()), "the pool was meant to force a retraction"
    for rid, p in prompts.items():
        assert done[rid].output_ids == reference(p, 20)
    check_idle(sched)
    assert len(cached_slots(sched.cache.tree)) > 0  # the plain requests were cached


def test_capture_matches_up_to_its_first_position():
    sched, runner, outputs = make_scheduler()
    p = prompt(80, 12)
    sched.inbox.put(AddReq(make_req("plain", p, max_new=3)))
    run(sched)
    specs = {
        "at5": CaptureSpec(layers=(0,), sites=("resid_post",), positions=(5, 9)),
        "last": CaptureSpec(layers=(0,), sites=("resid_post",), positions="last"),
        "all": CaptureSpec(layers=(0,), sites=("resid_post",), positions="all"),
    }
    for rid, cap in specs.items():
        sched.inbox.put(AddReq(with_spec(make_req(rid, p, max_new=3), InterventionSpec(capture=cap))))
        run(sched)
    hidden = with_spec(make_req("hidden", p, max_new=3), InterventionSpec(hidden_states=True))
    sched.inbox.put(AddReq(hidden))
    run(sched)
    done = finished(outputs)
    assert [done[r].cached_tokens for r in ("at5", "last", "all", "hidden")] == [5, 11, 0, 0]
    assert len(cached_slots(sched.cache.tree)) == 12 + 2  # capture-only KV is shared, not duplicated
