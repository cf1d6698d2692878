"""The Batch API's two metrics, as a collector (plain counts; no `_created` series, like
the proxy's other metrics)."""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

STATES = ("completed", "failed", "expired", "cancelled")


class BatchMetrics(Collector):
    def __init__(self) -> None:
        self.lines = dict.fromkeys(STATES, 0)
        self.avoided_grams = 0.0

    def line_ended(self, state: str) -> None:
        if state in self.lines:  # a bounded label: nothing else is counted
            self.lines[state] += 1

    def batch_avoided(self, grams: float) -> None:
        self.avoided_grams += max(0.0, grams)  # a counter never goes down

    def collect(self) -> Iterator[CounterMetricFamily]:
        lines = CounterMetricFamily("carbon_proxy_batch_lines", "Batch API lines ended, by state.", labels=["state"])
        for state, count in self.lines.items():
            lines.add_metric([state], count)
        yield lines
        yield CounterMetricFamily(
            "carbon_proxy_batch_avoided_co2e_grams",
            "gCO2e finished batches avoided by running when they ran rather than at submission.",
            value=self.avoided_grams,
        )
