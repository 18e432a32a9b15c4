"""Pausing generation (abort / retract / in_place, then continue) and priority scheduling
(order, preemption), driven step by step with the fake runner of test_scheduler.py (its KV
checks catch any slot a pause or a preemption would lose or share)."""

from __future__ import annotations

import pytest

from research_rt.core.messages import AbortReq, AddReq, ContinueGeneration, FlushCache, PauseGeneration
from research_rt.scheduler.priority import PriorityPolicy
from research_rt.server_args import ServerArgs
from tests.scheduler.test_scheduler import (
    check_idle,
    check_invariants,
    finished,
    make_req,
    make_scheduler,
    prompt,
    reference,
    run,
)


def send(sched, msg):
    """Deliver a replying message the way the loop does, and return its reply."""
    sched.handle(msg)
    return msg.reply.result(timeout=1)


def steps(sched, n: int) -> None:
    for _ in range(n):
        assert sched.step()
        check_invariants(sched)


def held_slots(sched) -> dict[str, list[int]]:
    rows = sched.cache.req_to_token.table
    return {r.rid: rows[r.req_pool_row, : r.kv_len].tolist() for r in sched.running}


# ---------------------------------------------------------------- pause
def test_in_place_pause_keeps_kv_and_outputs():
    sched, runner, outputs = make_scheduler()
    prompts = {f"r{i}": prompt(100 + i, 7 + 2 * i) for i in range(3)}
    for rid, p in prompts.items():
        sched.inbox.put(AddReq(make_req(rid, p, max_new=12)))
    steps(sched, 4)
    assert send(sched, PauseGeneration("in_place")) is None
    before = held_slots(sched)
    n_batches = len(runner.batches)
    late = prompt(200, 5)
    sched.inbox.put(AddReq(make_req("late", late, max_new=6)))  # arrives while paused: waits
    for _ in range(5):
        assert sched.step() is False
        check_invariants(sched)
    assert len(runner.batches) == n_batches, "a paused scheduler ran a forward"
    assert held_slots(sched) == before and [r.rid for r in sched.waiting] == ["late"]
    assert not finished(outputs)
    assert send(sched, FlushCache()) is False  # running requests hold KV
    assert send(sched, ContinueGeneration()) is True
    assert send(sched, ContinueGeneration()) is False  # not paused any more
    run(sched)
    done = finished(outputs)
    for rid, p in prompts.items():
        assert done[rid].output_ids == reference(p, 12)
    assert done["late"].output_ids == reference(late, 6)
    assert sched.counters.num_retractions == 0


def test_retract_pause_frees_kv_flushes_and_resumes():
    sched, runner, outputs = make_scheduler()
    prompts = {f"r{i}": prompt(110 + i, 6 + 3 * i) for i in range(3)}
    reqs = {rid: make_req(rid, p, max_new=10) for rid, p in prompts.items()}
    for r in reqs.values():
        sched.inbox.put(AddReq(r))
    steps(sched, 3)
    order = [r.rid for r in sched.running]
    send(sched, PauseGeneration("retract"))
    check_invariants(sched)
    assert sched.running == [] and [r.rid for r in sched.waiting] == order
    assert all(r.req_pool_row == -1 and r.is_retracted for r in reqs.values())
    assert sched.cache.kv_pool.available_size() + sched.cache.tree.evictable_size == sched.cache.kv_pool.size
    assert sched.step() is False
    assert send(sched, FlushCache()) is True  # nothing holds KV: the stale cache can go
    assert sched.cache.kv_pool.available_size() == sched.cache.kv_pool.size
    send(sched, ContinueGeneration())
    run(sched)
    done = finished(outputs)
    for rid, p in prompts.items():
        assert done[rid].output_ids == reference(p, 10)
        assert done[rid].finished_reason.type == "length"


def test_retract_pause_restarts_a_chunked_prefill():
    sched, runner, outputs = make_scheduler(chunked_prefill_size=8)
    p = prompt(120, 30)
    req = make_req("long", p, max_new=4)
    req.return_logprob, req.logprob_start_len = True, 2
    sched.inbox.put(AddReq(req))
    steps(sched, 2)  # two chunks of 8 computed
    assert sched.chunked is req and req.kv_len == 16
    send(sched, PauseGeneration("retract"))
    check_invariants(sched)
    assert sched.chunked is None and sched.waiting == [req] and req.req_pool_row == -1
    assert req.input_token_logprobs == [] and not req.is_retracted
    send(sched, ContinueGeneration())
    run(sched)
    done = finished(outputs)["long"]
    assert done.output_ids == reference(p, 4)
    # recorded once over the whole prompt, not twice for the chunks computed before the pause
    assert [t for _, t in done.input_token_logprobs] == p[2:]


def test_abort_pause_ends_everything_and_later_requests_wait():
    sched, runner, outputs = make_scheduler(chunked_prefill_size=8, max_running=2)
    prompts = {"a": prompt(130, 6), "b": prompt(131, 20), "c": prompt(132, 5), "d": prompt(133, 4)}
    for rid, p in prompts.items():
        sched.inbox.put(AddReq(make_req(rid, p, max_new=8)))
    steps(sched, 2)  # a running, b chunked, c and d waiting
    assert sched.chunked is not None
    send(sched, PauseGeneration("abort"))
    check_invariants(sched)
    done = finished(outputs)
    assert set(done) == set(prompts)
    assert all(r.finished_reason.type == "abort" for r in done.values())
    check_idle(sched)
    late = prompt(134, 5)
    sched.inbox.put(AddReq(make_req("late", late, max_new=3)))
    assert sched.step() is False and "late" not in finished(outputs)
    send(sched, ContinueGeneration())
    run(sched)
    assert finished(outputs)["late"].output_ids == reference(late, 3)


def test_abort_while_paused_in_place_ends_at_once():
    sched, runner, outputs = make_scheduler()
    for rid, seed in (("x", 140), ("y", 141)):
        sched.inbox.put(AddReq(make_req(rid, prompt(seed, 6), max_new=10)))
    steps(sched, 3)
    send(sched, PauseGeneration("in_place"))
    sched.inbox.put(AbortReq("x"))
    assert sched.step() is False
    check_invariants(sched)
    assert [r.rid for r in sched.running] == ["y"]
    x = finished(outputs)["x"]
    assert x.finished_reason.type == "abort" and x.output_ids == reference(prompt(140, 6), len(x.output_ids))
    send(sched, ContinueGeneration())
    run(sched)
    assert finished(outputs)["y"].output_ids == reference(prompt(141, 6), 10)


# ---------------------------------------------------------------- priority
def test_priority_order_higher_first_and_low_first_flag():
    for low_first, expect in ((False, ["p9", "p5", "p0", "pN"]), (True, ["p0", "pN", "p5", "p9"])):
        sched, runner, outputs = make_scheduler(
            max_running=1, enable_priority_scheduling=True, schedule_low_priority_values_first=low_first
        )
        for rid, prio in (("p0", 0), ("p9", 9), ("pN", None), ("p5", 5)):
            r = make_req(rid, prompt(150, 5), max_new=2)
            r.priority = prio
            sched.inbox.put(AddReq(r))
        run(sched)
        admitted = [items[0][0] for items in runner.prefill_batches()]
        assert admitted == expect, low_first  # None counts as 0 and keeps its arrival order


def test_priority_ignored_when_disabled():
    sched, runner, outputs = make_scheduler(max_running=1)
    for rid, prio in (("a", 0), ("b", 50), ("c", -3)):
        r = make_req(rid, prompt(151, 5), max_new=2)
        r.priority = prio
        sched.inbox.put(AddReq(r))
    run(sched)
    assert [items[0][0] for items in runner.prefill_batches()] == ["a", "b", "c"]


@pytest.mark.parametrize("urgent_priority, preempts", [(11, True), (10, False)])
def test_preemption_for_a_running_slot(urgent_priority, preempts):
    """max_running 1: an urgent request preempts the running one only if its priority is higher
    by MORE than the threshold (10); the preempted one resumes with the same tokens."""
    sched, runner, outputs = make_scheduler(max_running=1, enable_priority_scheduling=True)
    low_p, high_p = prompt(160, 6), prompt(161, 7)
    low = make_req("low", low_p, max_new=10)
    low.priority = 0
    sched.inbox.put(AddReq(low))
    steps(sched, 3)
    high = make_req("high", high_p, max_new=4)
    high.priority = urgent_priority
    sched.inbox.put(AddReq(high))
    sched.step()
    check_invariants(sched)
    assert [r.rid for r in sched.running] == (["high"] if preempts else ["low"])
    assert low.is_retracted is preempts
    run(sched)
    done = finished(outputs)
    assert done["low"].output_ids == reference(low_p, 10) and done["high"].output_ids == reference(high_p, 4)
    order = [o.rid for o in outputs if o.finished]
    assert order == (["high", "low"] if preempts else ["low", "high"])


def test_preemption_for_kv_room():
    """A pool too small for both: the urgent request retracts the running low-priority one."""
    sched, runner, outputs = make_scheduler(pool_size=48, enable_priority_scheduling=True)
    low_p, high_p = prompt(170, 20), prompt(171, 18)
    low = make_req("low", low_p, max_new=10)
    low.priority = -20
    sched.inbox.put(AddReq(low))
    steps(sched, 2)
    high = make_req("high", high_p, max_new=10)
    high.priority = 0
    sched.inbox.put(AddReq(high))
    sched.step()
    check_invariants(sched)
    assert [r.rid for r in sched.running] == ["high"] and low.is_retracted
    run(sched, limit=5000)
    done = finished(outputs)
    assert done["low"].output_ids == reference(low_p, 10) and done["high"].output_ids == reference(high_p, 10)


def test_no_preemption_when_it_cannot_make_room():
    """Retracting every eligible request would not free enough (the other running one is within
    the threshold): nothing is preempted, and the urgent request waits its turn."""
    sched, runner, outputs = make_scheduler(pool_size=64, enable_priority_scheduling=True)
    mid = make_req("mid", prompt(180, 30), max_new=4)
    mid.priority = 45
    small = make_req("small", prompt(181, 4), max_new=4)
    small.priority = 0
    for r in (mid, small):
        sched.inbox.put(AddReq(r))
    steps(sched, 1)
    urgent = make_req("urgent", prompt(182, 30), max_new=4)
    urgent.priority = 50
    sched.inbox.put(AddReq(urgent))
    sched.step()
    check_invariants(sched)
    assert {r.rid for r in sched.running} == {"mid", "small"} and not small.is_retracted
    assert [r.rid for r in sched.waiting] == ["urgent"]
    run(sched, limit=5000)
    done = finished(outputs)
    assert done["urgent"].output_ids == reference(prompt(182, 30), 4)
    assert sched.counters.num_retractions == 0


def test_policy_victims_and_retraction_key():
    policy = PriorityPolicy(
        ServerArgs(enable_priority_scheduling=True, priority_scheduling_preemption_threshold=2)
    )
    reqs = []
    for rid, prio, out in (("a", 0, 5), ("b", 0, 1), ("c", 3, 0), ("d", None, 9)):
        r = make_req(rid, [1, 2], max_new=20)
        r.priority, r.output_ids = prio, [7] * out
        reqs.append(r)
    urgent = make_req("u", [1], max_new=2)
    urgent.priority = 3
    assert [v.rid for v in policy.victims(urgent, reqs)] == ["b", "a", "d"]  # c is within the threshold
    assert min(reqs, key=policy.retraction_key).rid == "b"
    off = PriorityPolicy(ServerArgs())
    assert off.victims(urgent, reqs) == [] and off.order(reqs) == reqs
