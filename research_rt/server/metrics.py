"""Prometheus text exposition (`/metrics` with `--enable-metrics`) with SGLang's metric names.

No prometheus_client dependency: a few counters and histograms recorded by the HTTP layer, and
gauges read from the scheduler at scrape time. Every sample carries the `model_name` label.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    25.0,
    30.0,
)
E2E_BUCKETS = (
    0.1,
    0.2,
    0.4,
    0.8,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    40.0,
    60.0,
    80.0,
    100.0,
    150.0,
    200.0,
    250.0,
    300.0,
    350.0,
    500.0,
    1000.0,
)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cum = [], 0
        for le, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {cum}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class Metrics:
    """Request-level counters and latency histograms; `render(gauges)` gives the scrape text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_requests_total = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_finished(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens_total += prompt_tokens
            self.generation_tokens_total += completion_tokens
            self.num_requests_total += 1
            self.e2e.observe(seconds)

    def render(self, model_name: str, gauges: dict[str, float]) -> str:
        """Prometheus text format 0.0.4; `gauges` maps SGLang gauge names (without prefix) to values."""
        labels = f'model_name="{_escape(model_name)}"'
        lines: list[str] = []
        for name, value in gauges.items():
            lines += [
                f"# HELP sglang:{name} {name.replace('_', ' ')}.",
                f"# TYPE sglang:{name} gauge",
                f"sglang:{name}{{{labels}}} {float(value)}",
            ]
        with self._lock:
            counters: dict[str, Any] = {
                "prompt_tokens_total": self.prompt_tokens_total,
                "generation_tokens_total": self.generation_tokens_total,
                "num_requests_total": self.num_requests_total,
            }
            for name, value in counters.items():
                lines += [
                    f"# HELP sglang:{name} {name.replace('_', ' ')}.",
                    f"# TYPE sglang:{name} counter",
                    f"sglang:{name}{{{labels}}} {float(value)}",
                ]
            for name, hist in (
                ("time_to_first_token_seconds", self.ttft),
                ("e2e_request_latency_seconds", self.e2e),
            ):
                lines += [
                    f"# HELP sglang:{name} {name.replace('_', ' ')}.",
                    f"# TYPE sglang:{name} histogram",
                ]
                lines += hist.lines(f"sglang:{name}", labels)
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def register(app: Any) -> None:
    """Add `GET /metrics` (only with `--enable-metrics`)."""
    from sanic.response import text

    @app.get("/metrics")
    async def metrics_endpoint(request: Any) -> Any:
        state = request.app.ctx.state
        live = await state.live_stats()
        gauges = {
            "num_running_reqs": live["num_running_reqs"],
            "num_used_tokens": live["num_used_tokens"],
            "token_usage": live["token_usage"],
            "gen_throughput": live["last_gen_throughput"],
            "num_queue_reqs": live["num_queue_reqs"],
            "cache_hit_rate": live["cache_hit_rate"],
        }
        body = state.metrics.render(state.served_model_name, gauges)
        return text(body, content_type="text/plain; version=0.0.4; charset=utf-8")
