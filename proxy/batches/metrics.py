"""The Batch API's metrics, as a collector (plain counts; no `_created` series, like the
proxy's other metrics): lines ended, grams avoided, work deferred, and the latency guard."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

STATES = ("completed", "failed", "expired", "cancelled")


class BatchMetrics(Collector):
    def __init__(self) -> None:
        self.lines = dict.fromkeys(STATES, 0)
        self.avoided_grams = 0.0
        self.runner: Any = None
        """The BatchRunner (set once built): lines deferred and in flight, its guard."""

    def line_ended(self, state: str) -> None:
        if state in self.lines:  # a bounded label: nothing else is counted
            self.lines[state] += 1

    def batch_avoided(self, grams: float) -> None:
        self.avoided_grams += max(0.0, grams)  # a counter never goes down

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        lines = CounterMetricFamily("carbon_proxy_batch_lines", "Batch API lines ended, by state.", labels=["state"])
        for state, count in self.lines.items():
            lines.add_metric([state], count)
        yield lines
        yield CounterMetricFamily(
            "carbon_proxy_batch_avoided_co2e_grams",
            "gCO2e finished batches avoided by running when they ran rather than at submission.",
            value=self.avoided_grams,
        )
        runner = self.runner
        if runner is None:
            return
        yield GaugeMetricFamily(
            "carbon_proxy_batch_deferred_requests",
            "Lines of accepted batches not started yet (waiting for their low-carbon window, or for room).",
            value=runner.lines_deferred,
        )
        yield GaugeMetricFamily("carbon_proxy_batch_in_flight_requests", "Batch lines being answered now.", value=runner.lines_in_flight)
        yield GaugeMetricFamily(
            "carbon_proxy_batch_allowed_in_flight_requests",
            "Batch lines allowed in flight now: max_concurrency, lowered by the latency guard (0: paused).",
            value=runner.allowed_lines(),
        )
        guard = runner.guard
        yield CounterMetricFamily(
            "carbon_proxy_batch_latency_breaches",
            "Guard windows in which interactive p95 latency was over its objective (batch lines paused).",
            value=0 if guard is None else guard.breaches,
        )
