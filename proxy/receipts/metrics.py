"""Receipt and budget health for Prometheus, read at scrape time.

- carbon_proxy_receipts_dropped_total{reason}: receipts that will never reach the
  database: `store` (the store gave up on them: queue full, or still queued at shutdown),
  `poison` (a row SQLite cannot take, dropped alone), `store_error` (the store refused
  one), `accounting_error` (no figures, so no receipt).
- carbon_proxy_tenant_budget_remaining_grams{tenant}: budget - used - reserved, for
  allow-listed tenants only (label cardinality stays bounded), as this proxy sees it.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy.app import ProxyServer

DROP_REASONS = ("store", "poison", "store_error", "accounting_error")


class ReceiptsCollector(Collector):
    def __init__(self, proxy: ProxyServer) -> None:
        self._proxy = proxy

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        dropped = CounterMetricFamily(
            "carbon_proxy_receipts_dropped", "Receipts that will never reach the database, by reason.", labels=["reason"]
        )
        counts = dict.fromkeys(DROP_REASONS, 0)
        counts["store"] = int(getattr(self._proxy.receipts, "dropped_total", 0))
        counts["poison"] = int(getattr(self._proxy.receipts, "poison_total", 0))
        for reason, count in self._proxy.receipts_dropped.items():
            counts[reason] = counts.get(reason, 0) + count
        for reason, count in counts.items():
            dropped.add_metric([reason], count)
        yield dropped
        yield from self._fleet()
        budgets = self._proxy.budgets
        if not budgets.enabled:
            return
        remaining = GaugeMetricFamily(
            "carbon_proxy_tenant_budget_remaining_grams",
            "CO2e budget left in the current period (budget - used - reserved), allow-listed tenants.",
            labels=["tenant"],
        )
        allowed = self._proxy.tenancy.allow
        for tenant, grams in budgets.remaining_grams(allowed).items():
            remaining.add_metric([tenant], grams)
        yield remaining

    def _fleet(self) -> Iterator[Metric]:
        """With backend = "postgres": shipping and the shared budget store."""
        shipper = getattr(self._proxy.receipts, "shipper", None)
        postgres = getattr(self._proxy.receipts, "postgres", None)
        if shipper is None or postgres is None:
            return
        shipped = CounterMetricFamily("carbon_proxy_receipts_shipped", "Receipts shipped to the fleet's PostgreSQL.")
        shipped.add_metric([], shipper.shipped_total)
        backlog = GaugeMetricFamily(
            "carbon_proxy_receipts_outbox_backlog_receipts", "Receipts in the local outbox waiting to be shipped."
        )
        backlog.add_metric([], shipper.backlog)
        up = GaugeMetricFamily("carbon_proxy_postgres_up", "1 when the last call to the fleet's PostgreSQL succeeded.")
        up.add_metric([], 1.0 if postgres.healthy else 0.0)
        recycled = CounterMetricFamily(
            "carbon_proxy_postgres_recycled", "Times the connection pool was thrown away (dead connection, SQLSTATE 25006)."
        )
        recycled.add_metric([], postgres.recycled_total)
        yield from (shipped, backlog, up, recycled)
        budgets = self._proxy.budgets
        store_up = getattr(budgets, "store_up", None)
        if store_up is not None and budgets.enabled:
            budget_up = GaugeMetricFamily(
                "carbon_proxy_budget_store_up", "1 when fleet budgets are in sync with PostgreSQL; 0: local figures (basis budget=local)."
            )
            budget_up.add_metric([], 1.0 if store_up else 0.0)
            down = CounterMetricFamily(
                "carbon_proxy_budget_store_down_admissions", "Requests admitted on local budget figures while the store was down."
            )
            down.add_metric([], budgets.admitted_store_down_total)  # type: ignore[attr-defined]
            yield from (budget_up, down)
