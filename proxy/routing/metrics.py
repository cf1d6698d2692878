"""Routing metrics: requests each policy sent where, and the grams it avoided (predicted).

    carbon_proxy_routed_requests_total{upstream, policy, explored}
    carbon_proxy_avoided_co2e_grams_total{upstream, policy, baseline}

Counted once per request, from its provisional receipt (the route is known when the
request ends), so the totals equal the sum of the receipts' `avoided_grams`. Avoided
grams are a counterfactual prediction (the baseline's choice was never run) and can be
negative when an exploration pick costs more. Labels are configured names: bounded.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy.receipts.model import Receipt
from proxy.routing.header import parse_header


class RouteMetrics(Collector):
    def __init__(self, policy: str, baseline: str, upstreams: Iterable[str] = ()) -> None:
        self.policy = policy
        self.baseline = baseline
        # Every upstream from zero, so dashboards and rate() see the series before the first route.
        self.avoided_grams: dict[str, float] = dict.fromkeys(upstreams, 0.0)
        self.routed: dict[tuple[str, str], int] = {(name, "false"): 0 for name in self.avoided_grams}

    def record(self, receipt: Receipt, *_: object) -> None:
        if receipt.status != "provisional" or receipt.route is None:
            return
        explored = "true" if parse_header(receipt.route).get("explored") == "true" else "false"
        key = (receipt.upstream, explored)
        self.routed[key] = self.routed.get(key, 0) + 1
        self.avoided_grams[receipt.upstream] = self.avoided_grams.get(receipt.upstream, 0.0) + (receipt.avoided_grams or 0.0)

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        routed = CounterMetricFamily(
            "carbon_proxy_routed_requests",
            "Requests a pool's routing policy sent to each upstream; explored=true: an exploration pick.",
            labels=["upstream", "policy", "explored"],
        )
        for (upstream, explored), count in list(self.routed.items()):
            routed.add_metric([upstream, self.policy, explored], count)
        avoided = CounterMetricFamily(
            "carbon_proxy_avoided_co2e_grams",
            "Predicted CO2e of the baseline policy's choice minus that of the chosen upstream, summed "
            "(a counterfactual prediction, not a measurement; negative where a choice cost more).",
            labels=["upstream", "policy", "baseline"],
        )
        for upstream, grams in list(self.avoided_grams.items()):
            avoided.add_metric([upstream, self.policy, self.baseline], grams)
        yield routed
        yield avoided
