"""The Engine's instruments: profiling the scheduler thread and recording the expert distribution
of MoE models (a mixin of `Engine`; both run their work on the scheduler thread between steps)."""

from __future__ import annotations

from typing import Any

from research_rt.core.errors import RequestError


class InstrumentsMixin:
    """Needs the Engine's `call_in_scheduler`, `profiler`, `runner` and `model_path`."""

    def start_profile(
        self, output_dir: str, num_steps: int | None = None, activities: list[str] | None = None
    ) -> None:
        self.call_in_scheduler(
            lambda: self.profiler.start(output_dir, num_steps, activities or ["CPU", "GPU"])
        )

    def stop_profile(self) -> str:
        return self.call_in_scheduler(self.profiler.stop)

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
