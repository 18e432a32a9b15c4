"""The Engine's instruments: the scheduler's statistics, profiling the scheduler thread, recording
the expert distribution of MoE models (all run their work on the scheduler thread between steps),
and the state of the decode step's compilation (a mixin of `Engine`)."""

from __future__ import annotations

from typing import Any

from research_rt.core.errors import RequestError
from research_rt.scheduler.stats import SchedulerStats


class InstrumentsMixin:
    """Needs the Engine's `call_in_scheduler`, `scheduler`, `profiler`, `runner` and `model_path`."""

    # ---------------------------------------------------------------- statistics
    def stats(self) -> SchedulerStats:
        """A consistent snapshot taken on the scheduler thread between two steps, with the KV pool
        integrity check when idle (`kv_pool_whole`)."""
        return self.call_in_scheduler(lambda: self.scheduler.stats(check_pool=True), timeout=30)

    def load(self) -> SchedulerStats:
        """The same figures read without waiting for the scheduler (no integrity check)."""
        return self.scheduler.stats()

    def is_idle(self, timeout: float | None = None) -> bool:
        """Whether nothing is queued or running (asked on the scheduler thread, between steps)."""
        return bool(self.call_in_scheduler(self.scheduler.is_idle, timeout))

    def check_pool_integrity(self) -> None:
        """Assert no KV slot is lost (the scheduler must be idle)."""
        assert self.stats().kv_pool_whole, "the KV pool is not whole (see the log)"

    # ---------------------------------------------------------------- profiling
    def start_profile(
        self, output_dir: str, num_steps: int | None = None, activities: list[str] | None = None
    ) -> None:
        self.call_in_scheduler(
            lambda: self.profiler.start(output_dir, num_steps, activities or ["CPU", "GPU"])
        )

    def stop_profile(self) -> str:
        return self.call_in_scheduler(self.profiler.stop)

    # ---------------------------------------------------------------- compilation
    def compiled_decode(self) -> list[str]:
        """The decode shape families ("1": batch 1, "2+": larger) that run compiled now; until a
        family's graph is built (in the background by default) its batches run eager."""
        graphs = getattr(self.runner, "graph_runner", None)
        return [] if graphs is None else [{1: "1", 2: "2+"}[f] for f in sorted(graphs.ready_families)]

    def wait_for_compile(self, timeout: float | None = None) -> bool:
        """Block until the background compile has ended (True; at once when compile is off), or
        `timeout` passed (False). `compiled_decode()` says which families it built."""
        graphs = getattr(self.runner, "graph_runner", None)
        return True if graphs is None else graphs.compiled_all.wait(timeout)

    # ---------------------------------------------------------------- expert distribution
    def _expert_recorder(self) -> Any:
        recorder = getattr(self.runner, "expert_recorder", None)
        if recorder is None:
            raise RequestError(
                f"{self.model_path} is not a MoE model (no mixture-of-experts layers): there is no expert distribution to record."
            )
        return recorder

    def start_expert_distribution_record(self) -> None:
        """Clear the counts and count every MoE layer's top-k routing from the next step on."""
        self.call_in_scheduler(self._expert_recorder().start)

    def stop_expert_distribution_record(self) -> None:
        self.call_in_scheduler(self._expert_recorder().stop)

    def dump_expert_distribution_record(self, directory: str | None = None) -> str:
        """Write `expert_distribution_rank0_timestamp<time>.csv` into `directory` (default: the
        current directory), reset the counts, and return the file's path."""
        recorder = self._expert_recorder()
        return str(self.call_in_scheduler(lambda: recorder.dump(directory or ".")))
