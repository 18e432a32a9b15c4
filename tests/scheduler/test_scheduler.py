"""The scheduler loop driven step by step with a fake model runner (no real model).

The fake runner keeps, per KV slot, the token id and position "stored" there. Every batch it
checks that the request's row points at slots holding exactly its tokens (so KV bookkeeping
errors are caught), and its logits pick next = f(tokens read back from the KV slots), so any
wrong reuse of the cache also changes the outputs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from research_rt.cache.kv_pool import KVPool, ReqToTokenPool
from research_rt.cache.radix_cache import RadixCache
from research_rt.core.forward_batch import ForwardMode
from research_rt.core.messages import AbortReq, AddReq
from research_rt.core.req import Req
from research_rt.core.sampling_params import SamplingParams
from research_rt.sampling.sampler import Sampler
from research_rt.scheduler.scheduler import Scheduler
from research_rt.server_args import ServerArgs

VOCAB = 97


def cached_slots(tree) -> list[int]:
    """Every slot the prefix cache holds (a NoPrefixCache holds none)."""
    nodes = tree._all_nodes() if isinstance(tree, RadixCache) else []
    return [int(s) for n in nodes for s in n.value]


def next_token(tokens: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) + 7) % VOCAB


def reference(prompt: list[int], n: int, stop: set[int] | frozenset[int] = frozenset()) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        t = next_token(seq)
        seq.append(t)
        out.append(t)
        if t in stop:
            break
    return out


class FakeRunner:
    def __init__(self, pool_size: int, max_running: int, context_len: int = 512) -> None:
        self.kv_pool = KVPool(pool_size, 1, 1, 1, torch.float32, "cpu")
        self.req_to_token = ReqToTokenPool(max_running, context_len, "cpu")
        self.max_running_requests = max_running
        self.sampler = Sampler()
        self.tok = torch.full((pool_size + 1,), -1, dtype=torch.int64)
        self.pos = torch.full((pool_size + 1,), -1, dtype=torch.int64)
        self.batches: list[tuple[ForwardMode, list[tuple[str, int, int, int]]]] = []
        self.tree = None  # set by make_scheduler
        self.mixed_batches: list[tuple[list[str], list[str]]] = []

    def make_batch(self, mode, steps, out_loc, capture_hidden=False, decode_items=None):
        if decode_items:  # a mixed chunk: one-token decodes after the extend tokens
            assert mode is ForwardMode.EXTEND and all(s.length == 1 for s in decode_items)
            dec_loc = torch.stack(
                [self.req_to_token.table[s.req.req_pool_row, s.start] for s in decode_items]
            )
            batch = self.make_batch(mode, [*steps, *decode_items], torch.cat([out_loc.reshape(-1), dec_loc]))
            self.mixed_batches.append(([s.req.rid for s in steps], [s.req.rid for s in decode_items]))
            return batch
        out = out_loc.reshape(-1)
        assert len(out) == sum(s.length for s in steps)
        assert (out > 0).all(), "dummy slot 0 used for a real token"
        assert out.unique().numel() == out.numel()
        assert not set(out.tolist()) & set(self.kv_pool.free_slots.tolist()), "writing into a free slot"
        tree_slots = set(cached_slots(self.tree))
        assert not set(out.tolist()) & tree_slots, "overwriting a slot the radix tree owns"
        assert len({id(s.req) for s in steps}) == len(steps)
        if mode is ForwardMode.DECODE:
            assert all(s.length == 1 for s in steps)
        for s in steps:
            r = s.req
            assert r.req_pool_row >= 0 and s.start == r.kv_len
            assert s.start + s.length <= r.seq_len
            row = self.req_to_token.table[r.req_pool_row]
            prefix = row[: s.start]
            assert self.tok[prefix].tolist() == r.fill_ids[: s.start], "row points at wrong KV"
            assert self.pos[prefix].tolist() == list(range(s.start))
            assert row[s.start : s.start + s.length].unique().numel() == s.length
        self.batches.append((mode, [(s.req.rid, s.start, s.length, s.req.seq_len) for s in steps]))
        return SimpleNamespace(mode=mode, steps=list(steps), out_loc=out.clone())

    def forward(self, batch, logit_rows):
        flat = []
        i = 0
        for s in batch.steps:
            for p in range(s.start, s.start + s.length):
                slot = int(batch.out_loc[i])
                self.tok[slot] = s.req.fill_ids[p]
                self.pos[slot] = p
                flat.append((s.req, p))
                i += 1
        logits = torch.zeros(len(logit_rows), VOCAB)
        for j, row in enumerate(logit_rows.tolist()):
            req, p = flat[row]
            slots = self.req_to_token.table[req.req_pool_row, : p + 1]
            assert self.pos[slots].tolist() == list(range(p + 1))
            logits[j, next_token(self.tok[slots].tolist())] = 10.0
        return logits, torch.zeros(len(logit_rows), 1)

    def prefill_batches(self):
        return [items for mode, items in self.batches if mode is ForwardMode.EXTEND]


def make_scheduler(pool_size=4096, max_running=16, **args):
    runner = FakeRunner(pool_size, max_running)
    outputs: list = []
    sargs = ServerArgs(device="cpu", random_seed=0, **args).resolved()
    sched = Scheduler(runner, None, sargs, outputs.extend)
    runner.tree = sched.cache.tree
    return sched, runner, outputs


def make_req(rid: str, prompt: list[int], max_new: int = 8, stop_token_ids=None, min_new=0) -> Req:
    sp = SamplingParams(
        max_new_tokens=max_new, temperature=0.0, stop_token_ids=stop_token_ids, min_new_tokens=min_new
    )
    sp.verify()
    req = Req(
        rid=rid, input_ids=list(prompt), sampling=sp.normalize(), generator=torch.Generator().manual_seed(0)
    )
    SENT[rid] = req
    return req


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def check_invariants(sched: Scheduler) -> None:
    """Between steps: every slot is free, in the tree, or owned by exactly one live request."""
    sched.cache.tree.check_integrity(expect_idle=False)
    live = sched.running + ([sched.chunked] if sched.chunked else [])
    assert len(sched.running) <= sched.max_running
    owned = []
    for r in live:
        assert r.req_pool_row >= 0
        row = sched.cache.req_to_token.table[r.req_pool_row]
        cached, _ = sched.cache.tree.match_prefix(r.fill_ids[: r.cache_protected_len])
        assert row[: r.cache_protected_len].tolist() == cached.tolist()
        assert r.last_node is not None and r.last_node.lock_ref > 0 or r.cache_protected_len == 0
        owned += row[r.cache_protected_len : r.kv_len].tolist()
    for r in sched.waiting:
        assert r.req_pool_row == -1
    tree_slots = cached_slots(sched.cache.tree)
    all_slots = sched.cache.kv_pool.free_slots.tolist() + tree_slots + owned
    assert sorted(all_slots) == list(range(1, sched.cache.kv_pool.size + 1))
    assert sched.cache.req_to_token.available_size() == sched.cache.req_to_token.size - len(live)


def run(sched: Scheduler, limit: int = 2000) -> int:
    steps = 0
    while sched.step():
        check_invariants(sched)
        steps += 1
        assert steps < limit, "scheduler does not make progress"
    assert sched.is_idle()
    check_idle(sched)
    return steps


def check_idle(sched: Scheduler) -> None:
    sched.cache.tree.check_integrity(expect_idle=True)
    assert sched.cache.kv_pool.available_size() + sched.cache.tree.evictable_size == sched.cache.kv_pool.size
    assert sched.cache.req_to_token.available_size() == sched.cache.req_to_token.size


SENT: dict[str, Req] = {}  # every request a test made, by rid (outputs are snapshots)


def finished(outputs) -> dict[str, Req]:
    done = {}
    for o in outputs:
        if o.finished:
            assert o.rid not in done, "finished twice"
            req = SENT[o.rid]
            assert o.output_ids == req.output_ids and o.finished_reason == req.finished_reason
            done[o.rid] = req
    return done


# ---------------------------------------------------------------- tests
def test_outputs_match_reference():
    sched, runner, outputs = make_scheduler()
    prompts = {f"r{i}": prompt(i, 5 + 3 * i) for i in range(4)}
    for i, (rid, p) in enumerate(prompts.items()):
        sched.inbox.put(AddReq(make_req(rid, p, max_new=6 + i)))
    run(sched)
    done = finished(outputs)
    assert set(done) == set(prompts)
    for rid, p in prompts.items():
        r = done[rid]
        assert r.output_ids == reference(p, r.max_new_tokens)
        assert r.finished_reason.type == "length" and r.finished_reason.length == r.max_new_tokens


def test_stop_token_and_zero_new_tokens():
    sched, runner, outputs = make_scheduler()
    p = prompt(1, 9)
    ref = reference(p, 12)
    stop = ref[4]
    first = ref.index(stop)
    sched.inbox.put(AddReq(make_req("stop", p, max_new=12, stop_token_ids=[stop])))
    sched.inbox.put(AddReq(make_req("zero", prompt(2, 6), max_new=0)))
    run(sched)
    done = finished(outputs)
    assert done["stop"].output_ids == ref[: first + 1]
    assert done["stop"].finished_reason.type == "stop" and done["stop"].finished_reason.matched == stop
    assert done["zero"].output_ids == [] and done["zero"].finished_reason.type == "length"


def test_chunked_prefill_single_request():
    sched, runner, outputs = make_scheduler(chunked_prefill_size=8)
    p = prompt(3, 25)
    sched.inbox.put(AddReq(make_req("long", p, max_new=4)))
    run(sched)
    chunks = [(start, length) for items in runner.prefill_batches() for (_, start, length, _) in items]
    assert chunks == [(0, 8), (8, 8), (16, 8), (24, 1)]
    assert finished(outputs)["long"].output_ids == reference(p, 4)


def test_chunked_prefill_one_chunked_request_at_a_time():
    sched, runner, outputs = make_scheduler(chunked_prefill_size=8)
    prompts = {"a": prompt(4, 19), "b": prompt(5, 13), "c": prompt(6, 3), "d": prompt(7, 21)}
    for rid, p in prompts.items():
        sched.inbox.put(AddReq(make_req(rid, p, max_new=5)))
    chunked_seen = set()
    while sched.step():
        check_invariants(sched)
        if sched.chunked is not None:
            chunked_seen.add(sched.chunked.rid)
    check_idle(sched)
    progress = {rid: 0 for rid in prompts}
    for items in runner.prefill_batches():
        assert sum(length for (_, _, length, _) in items) <= 8
        incomplete = [rid for (rid, start, length, seq) in items if start + length < seq]
        assert len(incomplete) <= 1
        if incomplete:  # the chunked request is the last of its batch and fills the budget
            assert items[-1][0] == incomplete[0]
            assert sum(length for (_, _, length, _) in items) == 8
        for rid, start, length, _ in items:
            assert start == progress[rid], "chunks must be contiguous"
            progress[rid] = start + length
    assert progress == {rid: len(p) for rid, p in prompts.items()}
    assert {"a", "b", "d"} <= chunked_seen
    done = finished(outputs)
    for rid, p in prompts.items():
        assert done[rid].output_ids == reference(p, 5)


def test_max_running_requests_respected():
    sched, runner, outputs = make_scheduler(max_running=2)
    prompts = {f"r{i}": prompt(10 + i, 4 + i) for i in range(5)}
    for rid, p in prompts.items():
        sched.inbox.put(AddReq(make_req(rid, p, max_new=6)))
    max_seen = 0
    while sched.step():
        check_invariants(sched)
        max_seen = max(max_seen, len(sched.running))
    check_idle(sched)
    assert max_seen == 2
    for _mode, items in runner.batches:
        assert len(items) <= 2
    done = finished(outputs)
    assert all(done[rid].output_ids == reference(p, 6) for rid, p in prompts.items())


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_schedule_policy_order(policy):
    sched, runner, outputs = make_scheduler(schedule_policy=policy)
    base = prompt(20, 20)
    sched.inbox.put(AddReq(make_req("warm", base, max_new=2)))
    run(sched)
    n_before = len(runner.batches)
    sched.inbox.put(AddReq(make_req("other", prompt(21, 10), max_new=2)))
    sched.inbox.put(AddReq(make_req("sharer", base[:15] + [1, 2, 3], max_new=2)))
    sched.step()
    mode, items = runner.batches[n_before]
    assert mode is ForwardMode.EXTEND
    order = [rid for (rid, *_) in items]
    assert order == (["other", "sharer"] if policy == "fcfs" else ["sharer", "other"])
    run(sched)
    done = finished(outputs)
    assert done["sharer"].cached_tokens == 15 and done["other"].cached_tokens == 0


def test_radix_reuse_reports_cached_tokens():
    sched, runner, outputs = make_scheduler()
    p = prompt(30, 12)
    sched.inbox.put(AddReq(make_req("first", p, max_new=5)))
    run(sched)
    n_before = len(runner.batches)
    sched.inbox.put(AddReq(make_req("again", p, max_new=5)))
    run(sched)
    _, items = runner.batches[n_before]
    assert items == [("again", 11, 1, 12)]  # only the last prompt token is computed
    partial = p[:7] + [(p[7] + 1) % VOCAB, 6]
    sched.inbox.put(AddReq(make_req("partial", partial, max_new=3)))
    sched.inbox.put(AddReq(make_req("continued", p + reference(p, 5) + [9], max_new=3)))
    run(sched)
    done = finished(outputs)
    assert done["first"].cached_tokens == 0
    assert done["again"].cached_tokens == 11
    assert done["partial"].cached_tokens == 7
    # the finished request's output tokens were cached too (all but its last, never computed)
    assert done["continued"].cached_tokens == 12 + 4
    assert done["again"].output_ids == done["first"].output_ids == reference(p, 5)
    assert done["partial"].output_ids == reference(partial, 3)
    assert done["continued"].output_ids == reference(p + reference(p, 5) + [9], 3)
    assert sched.counters.num_cached_tokens == 11 + 7 + 16


def test_disabled_radix_cache_never_reuses():
    sched, runner, outputs = make_scheduler(disable_radix_cache=True)
    p = prompt(31, 12)
    for rid in ("first", "again"):
        sched.inbox.put(AddReq(make_req(rid, p, max_new=5)))
        run(sched)
        assert sched.cache.kv_pool.available_size() == sched.cache.kv_pool.size
    done = finished(outputs)
    assert done["again"].cached_tokens == 0
    assert done["again"].output_ids == reference(p, 5)


@pytest.mark.parametrize("radix", [True, False])
def test_small_pool_retracts_and_still_finishes(radix):
    prompts = {f"r{i}": prompt(40 + i, 10) for i in range(4)}

    def go(pool_size):
        sched, runner, outputs = make_scheduler(pool_size=pool_size, disable_radix_cache=not radix)
        reqs = {rid: make_req(rid, p, max_new=20) for rid, p in prompts.items()}
        for r in reqs.values():
            sched.inbox.put(AddReq(r))
        run(sched, limit=5000)
        return finished(outputs), reqs

    big, _ = go(4096)
    small, reqs = go(50)
    assert any(r.is_retracted for r in reqs.values()), "the pool was meant to force a retraction"
    for rid, p in prompts.items():
        assert small[rid].finished_reason.type == "length"
        assert small[rid].output_ids == big[rid].output_ids == reference(p, 20)


@pytest.mark.parametrize("pool_size", [4096, 60])
def test_mixed_chunks_decode_inside_prefill(pool_size):
    """--enable-mixed-chunk: running requests decode inside prefill forwards (never a request that
    is itself prefilling in that batch); outputs, slot ownership and the idle pool are unchanged,
    also when the pool is short (mixing is skipped rather than retracting)."""
    prompts = {f"r{i}": prompt(60 + i, 9 + 7 * i) for i in range(6)}
    sched, runner, outputs = make_scheduler(
        pool_size=pool_size, enable_mixed_chunk=True, chunked_prefill_size=8, max_running=3
    )
    for rid, p in prompts.items():
        sched.inbox.put(AddReq(make_req(rid, p, max_new=10)))
    run(sched, limit=5000)
    done = finished(outputs)
    for rid, p in prompts.items():
        assert done[rid].output_ids == reference(p, 10), rid
    assert runner.mixed_batches, "no prefill carried running decodes"
    for extend_rids, decode_rids in runner.mixed_batches:
        assert not set(extend_rids) & set(decode_rids)
    assert sched.counters.num_mixed_steps == len(runner.mixed_batches)


def test_request_larger_than_pool_is_aborted():
    sched, runner, outputs = make_scheduler(pool_size=20)
    sched.inbox.put(AddReq(make_req("huge", prompt(50, 10), max_new=30)))
    run(sched)
    r = finished(outputs)["huge"]
    assert r.finished_reason.type == "abort" and r.finished_reason.status_code == 400


def test_abort_waiting_and_running():
    sched, runner, outputs = make_scheduler(max_running=1)
    prompts = {f"r{i}": prompt(60 + i, 6) for i in range(3)}
    for rid, p in prompts.items():
        sched.inbox.put(AddReq(make_req(rid, p, max_new=10)))
    sched.step()  # prefill r0
    sched.step()  # decode r0
    assert [r.rid for r in sched.running] == ["r0"]
    sched.inbox.put(AbortReq("r2"))  # waiting
    sched.inbox.put(AbortReq("r0"))  # running
    run(sched)
    done = finished(outputs)
    assert done["r2"].finished_reason.type == "abort" and done["r2"].output_ids == []
    assert done["r0"].finished_reason.type == "abort"
    assert 0 < len(done["r0"].output_ids) < 10
    assert done["r0"].output_ids == reference(prompts["r0"], len(done["r0"].output_ids))
    assert done["r1"].finished_reason.type == "length"
    assert done["r1"].output_ids == reference(prompts["r1"], 10)
    assert all(rid != "r2" for _, items in runner.batches for (rid, *_) in items)


def test_abort_chunked_request():
    sched, runner, outputs = make_scheduler(chunked_prefill_size=8)
    p = prompt(70, 30)
    sched.inbox.put(AddReq(make_req("long", p, max_new=4)))
    sched.inbox.put(AddReq(make_req("short", prompt(71, 5), max_new=4)))
    sched.step()
    assert sched.chunked is not None and sched.chunked.rid == "long"
    sched.inbox.put(AbortReq("long"))
    run(sched)
    done = finished(outputs)
    assert done["long"].finished_reason.type == "abort" and done["long"].output_ids == []
    assert done["short"].output_ids == reference(prompt(71, 5), 4)


def test_abort_all():
    sched, runner, outputs = make_scheduler(max_running=2)
    for i in range(4):
        sched.inbox.put(AddReq(make_req(f"r{i}", prompt(80 + i, 5), max_new=50)))
    sched.step()
    sched.step()
    sched.inbox.put(AbortReq(None))
    run(sched)
    done = finished(outputs)
    assert set(done) == {"r0", "r1", "r2", "r3"}
    assert all(r.finished_reason.type == "abort" for r in done.values())


def test_flush_cache_only_when_idle():
    sched, runner, outputs = make_scheduler()
    p = prompt(90, 10)
    sched.inbox.put(AddReq(make_req("a", p, max_new=3)))
    sched.step()
    assert sched.flush_cache() is False
    run(sched)
    assert sched.cache.tree.evictable_size > 0
    assert sched.flush_cache() is True
    assert (
        sched.cache.tree.total_size() == 0
        and sched.cache.kv_pool.available_size() == sched.cache.kv_pool.size
    )
    sched.inbox.put(AddReq(make_req("b", p, max_new=3)))
    run(sched)
    assert finished(outputs)["b"].cached_tokens == 0


def test_duplicate_kv_computed_concurrently_is_freed():
    # A and B share a 6-token prefix and are prefilled in the same batch; B is chunked. A finishes
    # at once and caches its tokens, so B's next chunk insert finds tokens it computed as well:
    # those duplicate slots must go back to the pool (checked after every step and at the end).
    sched, runner, outputs = make_scheduler(chunked_prefill_size=8)
    x = prompt(100, 6)
    b_prompt = x + prompt(101, 10)
    sched.inbox.put(AddReq(make_req("a", x, max_new=1)))
    sched.inbox.put(AddReq(make_req("b", b_prompt, max_new=4)))
    run(sched)
    assert runner.prefill_batches()[0] == [("a", 0, 6, 6), ("b", 0, 2, 16)]
    done = finished(outputs)
    assert done["b"].cached_tokens == 0
    assert done["a"].output_ids == reference(x, 1)
    assert done["b"].output_ids == reference(b_prompt, 4)


def test_a_failing_request_ends_alone():
    """A request whose output processing raises (here: more top logprobs than the vocabulary,
    which the front would refuse) ends with an internal error; the others in its batch go on."""
    sched, runner, outputs = make_scheduler()
    prompts = {f"r{i}": prompt(100 + i, 6) for i in range(3)}
    for rid, p in prompts.items():
        req = make_req(rid, p, max_new=6)
        if rid == "r1":
            req.return_logprob, req.top_logprobs_num = True, VOCAB * 10
        sched.inbox.put(AddReq(req))
    run(sched)
    done = finished(outputs)
    reason = done["r1"].finished_reason
    assert reason.type == "abort" and reason.status_code == 500
    for rid in ("r0", "r2"):
        assert done[rid].output_ids == reference(prompts[rid], 6)
        assert done[rid].finished_reason.type == "length"
