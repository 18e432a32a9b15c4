import random

from research_rt.speculative.ngram import NgramMatcher


def brute_force(seq: list[int], lo: int, hi: int, k: int) -> list[int]:
    """The reference: scan for the most recent earlier occurrence, longest window first."""
    for n in range(min(hi, len(seq) - 1), lo - 1, -1):
        suffix = seq[len(seq) - n :]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start : start + n] == suffix:
                return seq[start + n : start + n + k]
    return []


def test_continues_after_the_last_earlier_occurrence():
    m = NgramMatcher(1, 3)
    m.extend([1, 2, 3, 4, 9, 1, 2, 3, 5, 1, 2])
    # suffix [1, 2] last occurred at 5..7, followed by 3, 5, 1
    assert m.draft(3) == [3, 5, 1]
    assert m.draft(1) == [3]


def test_prefers_the_longest_window():
    m = NgramMatcher(1, 2)
    m.extend([7, 3, 8, 5, 3, 6, 7, 3])
    # [7, 3] matched at the start (-> 8), though [3] alone occurred later (-> 6)
    assert m.draft(2) == [8, 5]


def test_no_match_and_never_the_suffix_itself():
    m = NgramMatcher(2, 4)
    m.extend([1, 2, 3, 4])
    assert m.draft(4) == []
    m = NgramMatcher(1, 1)
    m.extend([5])
    assert m.draft(3) == []


def test_incremental_matches_brute_force():
    rng = random.Random(0)
    for trial in range(30):
        lo, hi = rng.randint(1, 3), rng.randint(3, 6)
        m = NgramMatcher(lo, hi)
        seq: list[int] = []
        for _ in range(60):
            seq.append(rng.randint(0, 4))
            m.sync(seq)
            assert m.draft(5) == brute_force(seq, lo, hi, 5), (trial, seq)


def test_accepted_run():
    from research_rt.speculative.accept import accepted_run

    assert accepted_run([4, 5, 6, 7], [4, 5, 9]) == [4, 5, 6]
    assert accepted_run([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]
    assert accepted_run([1, 5, 6, 7], [4, 5, 6]) == [1]
