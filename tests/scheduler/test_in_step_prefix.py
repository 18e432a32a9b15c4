"""Prefixes shared within a prefill step (scheduler/in_step_prefix.py) and a running request's prompt
in the prefix cache: requests sent together with a long common prefix compute it once."""

from __future__ import annotations

import pytest

from research_rt.cache.radix_cache import common_prefix_len
from research_rt.core.messages import AddReq
from research_rt.scheduler.in_step_prefix import MIN_SHARED, StepPrefixes
from tests.scheduler.test_scheduler import finished, make_req, make_scheduler, prompt, reference, run


def send_all(sched, prompts: dict[str, list[int]], max_new: int = 4) -> None:
    for rid, p in prompts.items():
        sched.inbox.put(AddReq(make_req(rid, p, max_new=max_new)))


@pytest.mark.parametrize("chunk", [None, 64])
def test_requests_sharing_a_long_prefix_compute_it_once(chunk):
    shared = prompt(200, 100)
    prompts = {f"s{i}": shared + prompt(201 + i, 6) for i in range(5)}
    sched, runner, outputs = make_scheduler(chunked_prefill_size=chunk)
    send_all(sched, prompts)
    run(sched)
    batches = runner.prefill_batches()
    # s0 alone (in chunks when they are smaller than its prompt), then the others from the cache
    s0_steps = 1 if chunk is None else 2
    assert [[(rid, start, n) for rid, start, n, _ in b] for b in batches[:s0_steps]] == (
        [[("s0", 0, 106)]] if chunk is None else [[("s0", 0, 64)], [("s0", 64, 42)]]
    )
    assert [(rid, start, n) for rid, start, n, _ in batches[s0_steps]] == [
        (f"s{i}", 100, 6) for i in range(1, 5)
    ]
    done = finished(outputs)
    assert [done[f"s{i}"].cached_tokens for i in range(5)] == [0, 100, 100, 100, 100]
    for rid, p in prompts.items():
        assert done[rid].output_ids == reference(p, 4)


def test_a_short_or_minor_shared_part_does_not_hold_a_request_back():
    """Below MIN_SHARED tokens, or less than half of what the request computes: same step."""
    short = prompt(210, MIN_SHARED - 1)
    minor = prompt(211, 40)
    prompts = {
        "a": short + prompt(212, 5),
        "b": short + prompt(213, 5),
        "c": minor + prompt(214, 50),
        "d": minor + prompt(215, 50),
    }
    sched, runner, outputs = make_scheduler()
    send_all(sched, prompts)
    run(sched)
    assert [rid for rid, *_ in runner.prefill_batches()[0]] == ["a", "b", "c", "d"]
    done = finished(outputs)
    for rid, p in prompts.items():
        assert done[rid].output_ids == reference(p, 4)


def test_without_a_prefix_cache_nothing_waits():
    shared = prompt(220, 100)
    prompts = {f"s{i}": shared + prompt(221 + i, 6) for i in range(3)}
    sched, runner, outputs = make_scheduler(disable_radix_cache=True)
    send_all(sched, prompts)
    run(sched)
    assert [rid for rid, *_ in runner.prefill_batches()[0]] == ["s0", "s1", "s2"]
    assert all(r.cached_tokens == 0 for r in finished(outputs).values())


def test_a_running_requests_prompt_is_shared_before_it_finishes():
    p = prompt(230, 50)
    sched, runner, outputs = make_scheduler()
    sched.inbox.put(AddReq(make_req("long", p, max_new=40)))
    for _ in range(3):  # its prefill, then decode steps
        sched.step()
    sched.inbox.put(AddReq(make_req("later", p + [5, 6], max_new=4)))
    run(sched)
    done = finished(outputs)
    assert done["later"].cached_tokens == 50
    assert done["later"].output_ids == reference(p + [5, 6], 4)
    assert done["long"].output_ids == reference(p, 40)


def test_step_prefixes_match_past_the_cached_part():
    base = list(range(200))
    step = StepPrefixes(enabled=True)
    step.add(base, cached=10)
    assert step.should_wait(base[:150] + [999] * 20, cached=10, extend=160)  # 140 shared of 160
    assert not step.should_wait(base[:150] + [999] * 200, cached=10, extend=340)  # 140 of 340
    assert not step.should_wait(base, cached=20, extend=180)  # another cached length: another key
    off = StepPrefixes(enabled=False)  # no prefix cache
    off.add(base, cached=10)
    assert not off.should_wait(base, cached=10, extend=190)
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
