"""RadixCache: match/insert/split, locks, LRU eviction, and a randomized property test."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
import torch

from research_rt.cache import radix_cache as rc_mod
from research_rt.cache.kv_pool import KVPool
from research_rt.cache.radix_cache import RadixCache


@pytest.fixture(autouse=True)
def fake_clock(monkeypatch):
    """A strictly increasing clock so LRU order never depends on timer resolution."""
    counter = itertools.count(1)
    monkeypatch.setattr(rc_mod, "time", SimpleNamespace(monotonic=lambda: float(next(counter))))


def make(n: int = 64) -> tuple[KVPool, RadixCache]:
    pool = KVPool(n, num_layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    return pool, RadixCache(pool)


def put(pool: KVPool, tree: RadixCache, seq: list[int]) -> tuple[int, torch.Tensor]:
    """Insert `seq` with fresh slots as the scheduler does; free the duplicates; return (matched, slots)."""
    slots = pool.alloc(len(seq))
    assert slots is not None
    matched = tree.insert(seq, slots)
    pool.free(slots[:matched])
    return matched, slots


def tree_contents(tree: RadixCache) -> dict[tuple[int, ...], int]:
    """Every cached prefix -> the slot of its last token, read off the tree."""
    out: dict[tuple[int, ...], int] = {}
    stack = [((), tree.root)]
    while stack:
        path, node = stack.pop()
        for i in range(len(node.key)):
            out[path + tuple(node.key[: i + 1])] = int(node.value[i])
        full = path + tuple(node.key)
        for first, child in node.children.items():
            assert child.key[0] == first
            stack.append((full, child))
    return out


# ---------------------------------------------------------------- hand-built examples
def test_empty_tree_and_empty_key():
    pool, tree = make()
    slots, node = tree.match_prefix([1, 2, 3])
    assert slots.numel() == 0 and node is tree.root
    put(pool, tree, [1, 2, 3])
    slots, node = tree.match_prefix([])
    assert slots.numel() == 0 and node is tree.root
    tree.check_integrity()


def test_insert_returns_cached_prefix_len_and_splits():
    pool, tree = make()
    m1, s1 = put(pool, tree, [1, 2, 3, 4])
    assert m1 == 0
    m2, s2 = put(pool, tree, [1, 2, 5])
    assert m2 == 2
    # root has one child [1, 2] with children [3, 4] and [5]
    assert list(tree.root.children) == [1]
    top = tree.root.children[1]
    assert top.key == [1, 2]
    assert sorted(top.children) == [3, 5]
    assert top.children[3].key == [3, 4]
    assert top.children[5].key == [5]
    slots, node = tree.match_prefix([1, 2, 5, 9])
    assert slots.tolist() == s1[:2].tolist() + s2[2:].tolist()
    assert node is top.children[5]
    slots, node = tree.match_prefix([1, 2, 3, 4, 6])
    assert slots.tolist() == s1.tolist()
    # identical re-insert: everything cached
    m3, _ = put(pool, tree, [1, 2, 3, 4])
    assert m3 == 4
    assert tree.total_size() == 5 == tree.evictable_size
    tree.check_integrity()
    assert pool.available_size() == 64 - 5


def test_insert_shorter_key_inside_node():
    pool, tree = make()
    _, s1 = put(pool, tree, [7, 8, 9, 10, 11])
    m, _ = put(pool, tree, [7, 8, 9])
    assert m == 3
    assert tree.total_size() == 5
    top = tree.root.children[7]
    assert top.key == [7, 8, 9] and list(top.children) == [10]
    slots, node = tree.match_prefix([7, 8, 9])
    assert node is top and slots.tolist() == s1[:3].tolist()
    tree.check_integrity()


def test_match_ending_inside_node_splits_it():
    pool, tree = make()
    _, s1 = put(pool, tree, [1, 2, 3, 4, 5])
    slots, node = tree.match_prefix([1, 2, 3, 9, 9])
    assert slots.tolist() == s1[:3].tolist()
    assert node.key == [1, 2, 3]
    assert node.parent is tree.root
    assert list(node.children) == [4] and node.children[4].key == [4, 5]
    assert tree.total_size() == 5
    tree.check_integrity()
    # no match at all
    slots, node = tree.match_prefix([2, 1])
    assert slots.numel() == 0 and node is tree.root


def test_lock_moves_sizes_between_evictable_and_protected():
    pool, tree = make()
    put(pool, tree, [1, 2, 3, 4])
    put(pool, tree, [1, 2, 5, 6, 7])
    assert tree.evictable_size == 7 and tree.protected_size == 0
    _, leaf = tree.match_prefix([1, 2, 5, 6, 7])
    tree.inc_lock_ref(leaf)
    assert tree.protected_size == 5 and tree.evictable_size == 2
    tree.check_integrity(expect_idle=False)
    with pytest.raises(AssertionError):
        tree.check_integrity(expect_idle=True)
    _, other = tree.match_prefix([1, 2, 3, 4])
    tree.inc_lock_ref(other)
    assert tree.protected_size == 7 and tree.evictable_size == 0
    tree.inc_lock_ref(leaf)  # second lock: no change
    assert tree.protected_size == 7
    tree.dec_lock_ref(leaf)
    assert tree.protected_size == 7
    tree.dec_lock_ref(leaf)
    assert tree.protected_size == 4 and tree.evictable_size == 3
    tree.dec_lock_ref(other)
    assert tree.protected_size == 0 and tree.evictable_size == 7
    tree.check_integrity()
    with pytest.raises(AssertionError):
        tree.dec_lock_ref(other)


def test_lock_survives_split():
    pool, tree = make()
    put(pool, tree, [1, 2, 3, 4])
    _, node = tree.match_prefix([1, 2, 3, 4])
    tree.inc_lock_ref(node)
    tree.match_prefix([1, 2, 9])  # splits the locked node
    put(pool, tree, [1, 2, 8])  # adds an unlocked sibling
    assert tree.protected_size == 4 and tree.evictable_size == 1
    tree.check_integrity(expect_idle=False)
    tree.dec_lock_ref(node)
    assert tree.protected_size == 0 and tree.evictable_size == 5
    tree.check_integrity()


def test_evict_lru_leaves_first():
    pool, tree = make(32)
    put(pool, tree, [1, 2, 3])  # oldest
    put(pool, tree, [4, 5])
    put(pool, tree, [6, 7, 8, 9])
    tree.match_prefix([1, 2, 3])  # touch: now [4, 5] is the least recently used
    freed = tree.evict(2)
    assert freed == 2
    assert set(tree.root.children) == {1, 6}
    freed = tree.evict(1)  # next LRU is [6..9]; a whole leaf goes
    assert freed == 4
    assert set(tree.root.children) == {1}
    assert pool.available_size() == 32 - 3
    tree.check_integrity()


def test_evict_cascades_to_parent_and_skips_locked():
    pool, tree = make(32)
    put(pool, tree, [1, 2, 3])
    put(pool, tree, [1, 2, 4])
    put(pool, tree, [5, 6])
    _, locked = tree.match_prefix([5, 6])
    tree.inc_lock_ref(locked)
    freed = tree.evict(100)
    assert freed == 4  # [3], [4], then their parent [1, 2]; never [5, 6]
    assert list(tree.root.children) == [5]
    assert tree.evictable_size == 0 and tree.protected_size == 2
    assert pool.available_size() == 30
    tree.check_integrity(expect_idle=False)
    tree.dec_lock_ref(locked)
    assert tree.evict(1) == 2
    assert pool.available_size() == 32
    tree.check_integrity()


def test_evict_locked_interior_keeps_path():
    pool, tree = make(32)
    put(pool, tree, [1, 2, 3, 4])
    _, mid = tree.match_prefix([1, 2, 9])  # node [1, 2]
    tree.inc_lock_ref(mid)
    assert tree.evict(10) == 2  # only the [3, 4] tail
    slots, _ = tree.match_prefix([1, 2, 3])
    assert len(slots) == 2
    tree.dec_lock_ref(mid)
    tree.check_integrity()


def test_evict_nonpositive_is_noop():
    pool, tree = make(8)
    put(pool, tree, [1, 2])
    assert tree.evict(0) == 0
    assert tree.total_size() == 2


def test_check_integrity_detects_leak_and_double_ownership():
    pool, tree = make(8)
    put(pool, tree, [1, 2, 3])
    pool.alloc(1)  # leaked slot
    with pytest.raises(AssertionError):
        tree.check_integrity()
    pool2, tree2 = make(8)
    _, slots = put(pool2, tree2, [1, 2, 3])
    pool2.free(slots[:1])  # slot both free and in the tree
    pool2.alloc(1)  # keep the count right; only uniqueness is broken now
    with pytest.raises(AssertionError):
        tree2.check_integrity()


def test_check_integrity_two_locks():
    pool, tree = make(8)
    put(pool, tree, [1, 2])
    _, node = tree.match_prefix([1, 2])
    tree.inc_lock_ref(node)
    tree.inc_lock_ref(node)  # two requests sharing the prefix [1, 2]
    tree.check_integrity(expect_idle=False)


# ---------------------------------------------------------------- randomized property test
def _ref_match(ref: dict[tuple[int, ...], int], key: list[int]) -> list[int]:
    out = []
    for i in range(len(key)):
        s = ref.get(tuple(key[: i + 1]))
        if s is None:
            break
        out.append(s)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_ops_against_reference(seed):
    rng = random.Random(seed)
    total = 120
    pool, tree = make(total)
    ref: dict[tuple[int, ...], int] = {}
    locks: list[tuple[object, tuple[int, ...]]] = []
    bases = [[rng.randrange(4) for _ in range(12)] for _ in range(4)]

    def rand_seq() -> list[int]:
        base = rng.choice(bases)
        cut = rng.randrange(0, len(base) + 1)
        return base[:cut] + [rng.randrange(4) for _ in range(rng.randrange(0, 6))]

    def check() -> None:
        tree.check_integrity(expect_idle=not locks)
        tree.check_integrity(expect_idle=False)
        assert tree_contents(tree) == ref
        # independent accounting: every slot is free or in the tree, exactly once
        all_slots = pool.free_slots.tolist() + list(ref.values())
        assert sorted(all_slots) == list(range(1, total + 1))
        protected = {p[:i] for _, p in locks for i in range(1, len(p) + 1)}
        assert tree.protected_size == len(protected)
        assert tree.evictable_size == len(ref) - len(protected)

    for _ in range(300):
        op = rng.random()
        if op < 0.4:
            seq = rand_seq()
            if not seq:
                continue
            expect = len(_ref_match(ref, seq))
            if pool.available_size() < len(seq):
                tree.evict(len(seq) - pool.available_size())
                after = tree_contents(tree)
                assert set(after) <= set(ref)
                ref = after
                expect = len(_ref_match(ref, seq))
                if pool.available_size() < len(seq):
                    check()
                    continue
            matched, slots = put(pool, tree, seq)
            assert matched == expect
            for i in range(matched, len(seq)):
                ref[tuple(seq[: i + 1])] = int(slots[i])
        elif op < 0.55:
            seq = rand_seq()
            slots, node = tree.match_prefix(seq)
            want = _ref_match(ref, seq)
            if seq and want:
                path = tuple(seq[: len(want)])
                assert ref[path] == want[-1]
                tree.inc_lock_ref(node)
                locks.append((node, path))
        elif op < 0.7:
            if locks:
                node, _ = locks.pop(rng.randrange(len(locks)))
                tree.dec_lock_ref(node)
        elif op < 0.8:
            n = rng.randrange(1, 20)
            before_free = pool.available_size()
            evictable = tree.evictable_size
            freed = tree.evict(n)
            after = tree_contents(tree)
            gone = set(ref) - set(after)
            assert set(after) <= set(ref)
            assert freed == len(gone) == pool.available_size() - before_free
            assert freed >= min(n, evictable)
            for _, p in locks:  # locked paths survive whole
                assert all(p[:i] in after for i in range(1, len(p) + 1))
            for p in gone:  # a freed slot is now in the free list
                assert ref[p] in set(pool.free_slots.tolist())
            ref = after
        else:
            seq = rand_seq()
            slots, node = tree.match_prefix(seq)
            want = _ref_match(ref, seq)
            assert slots.tolist() == want
            if want:
                assert node is not tree.root and node.key[-1] == seq[len(want) - 1]
            else:
                assert node is tree.root
        check()

    while locks:
        tree.dec_lock_ref(locks.pop()[0])
    check()
    tree.evict(total)
    assert pool.available_size() == total and tree.total_size() == 0
    tree.check_integrity()
