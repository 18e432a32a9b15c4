"""What the decoder scheduler does for `PauseGeneration` (the loop in loop.py does the rest).

While paused, `Scheduler.step` runs no forward: new requests queue up and wait, aborts end at once
(`reap_aborted`), and the prefix cache may be flushed as soon as nothing holds KV (after `abort` or
`retract`: a weight update can then drop the stale cache). Modes:
- abort: every queued and running request ends with finish reason `abort`;
- retract: running requests go back to the front of the queue in their order; their computed
  tokens stay in the prefix cache, so resuming recomputes little (nothing when not flushed). The
  request in the middle of a chunked prefill starts its prefill over (from the cache);
- in_place: requests keep their KV slots and continue exactly where they stopped, so their
  (greedy) outputs are those of an uninterrupted run.
"""

from __future__ import annotations

from research_rt.core.req import Req


class PauseMixin:
    """Needs the Scheduler's `waiting`, `running`, `chunked`, `decode_room`, `cache` and `_finish`."""

    def retract_running(self) -> None:
        chunked = self.chunked
        if chunked is not None:
            self.chunked = None
            self.cache.cache_req(chunked, finished=True)
            if not chunked.is_retracted:  # a retracted one recorded its prompt before: keep that
                _restart_prefill(chunked)
            self.waiting.insert(0, chunked)
        for req in reversed(self.running):  # each goes to the front: the queue keeps their order
            self.decode_room.retract(req, self.waiting, reset_ratio=False)
        self.running = []

    def reap_aborted(self) -> None:
        for req in [r for r in self.running if r.to_abort]:
            self.running.remove(req)
            self._finish(req, req.to_abort)
        if self.chunked is not None and self.chunked.to_abort:
            self._finish(self.chunked, self.chunked.to_abort)

    def holds_kv(self) -> bool:
        """Whether any request owns KV slots (a flush must wait); queued ones own none."""
        return bool(self.running) or self.chunked is not None


def _restart_prefill(req: Req) -> None:
    """Forget what a partly prefilled request recorded, so its prefill runs again from the start."""
    for acc in (
        req.input_token_logprobs,
        req.input_top_logprobs,
        req.input_token_ids_logprobs,
    ):  # captured activations need no reset: a recomputed position overwrites its row
        acc.clear()
