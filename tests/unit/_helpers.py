"""Shared test helpers."""

from __future__ import annotations

from research_rt.cache.radix_cache import RadixCache


def check_tree(tree: RadixCache, expect_idle: bool) -> None:
    """`tree.check_integrity`, working around its root-lock bug.

    BUG (radix_cache.py check_integrity): it asserts `parent.lock_ref >= child.lock_ref` for the
    root too, whose lock_ref is a constant 1, so it fails as soon as a top-level node holds two
    locks (two requests sharing a prefix). See test_radix_cache.py::test_check_integrity_two_locks.
    Raising the root's lock_ref for the duration of the check changes nothing else it verifies.
    """
    saved = tree.root.lock_ref
    tree.root.lock_ref = 1 << 40
    try:
        tree.check_integrity(expect_idle=expect_idle)
    finally:
        tree.root.lock_ref = saved
