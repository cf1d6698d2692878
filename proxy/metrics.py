"""Prometheus metrics on the admin listener (DESIGN.md section 7).

Two collectors feed the registry, both read at scrape time:
- per-request observations (this module): plain counters and bucket arrays updated
  from `ProxyServer.on_record`, one tally per bound label tuple;
- state (proxy.metrics_state): meter, attribution engine and grid intensity.

Why not prometheus_client's Counter/Histogram: each inc/observe takes a lock and costs
1-2 us; a request touches ten of them. Records and scrapes all run on the event loop
thread, so plain attribute updates are consistent and cost a few tens of nanoseconds.

Counting rule, so nothing is counted twice: every request produces a `provisional`
record when it ends and a `final` one once attribution has settled.
- requests, tokens, images, latency: counted once, on the provisional record (they
  are exact at the end of the request);
- energy and CO2e (counters and per-request histograms): counted once, on the final
  record only. Counters stay monotonic and equal to the settled figures; the price
  is a lag of one settling time (until every request overlapping this one has ended).

Cardinality is bounded: tenants through `Tenancy.label` (allow-list, else `other`),
models through `ModelLabels` (configured models plus the first MODEL_CAP seen).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.accounting import Figures
from proxy.app import ProxyServer
from proxy.exchange import MeteredExchange
from proxy.metrics_state import StateCollector
from proxy.receipts.metrics import ReceiptsCollector
from proxy.receipts.model import Receipt
from proxy.routing.metrics import RouteMetrics
from proxy.tenants import OTHER

MODEL_CAP = 50
"""Distinct model label values beyond the configured ones; the rest fold into `other`."""
MODEL_LABEL_MAX_CHARS = 100
UNKNOWN_MODEL = "unknown"
"""Label for requests whose body named no model (generic dialect, GET requests)."""

REQUEST_LABELS = ["upstream", "model", "tenant"]
REJECT_REASONS = (
    "invalid_request_target", "invalid_header", "method_not_allowed", "no_route", "request_too_large",
    "carbon_budget_exceeded", "budget_store_unavailable", "no_allowed_upstream",
)  # fmt: skip
LATENCY_LABELS = ["upstream", "model"]

# Bucket edges: per-request energy spans a few joules (short batched completion) to tens
# of kilojoules (long generation or diffusion on a multi-GPU group).
ENERGY_BUCKETS_JOULES = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0)
# 10 J at 450 g/kWh and PUE 1.2 is 1.5 mg; a 50 kJ request is about 7.5 g.
CO2E_BUCKETS_GRAMS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 10.0)
LATENCY_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS_SECONDS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1)


class ModelLabels:
    """Bounded model label values: configured models always, then the first `cap` others."""

    def __init__(self, configured: Iterable[str], cap: int = MODEL_CAP) -> None:
        self._known: dict[str, str] = {m: m[:MODEL_LABEL_MAX_CHARS] for m in configured}
        self._limit = len(self._known) + cap

    def label(self, model: str | None) -> str:
        if model is None:
            return UNKNOWN_MODEL
        value = self._known.get(model)
        if value is not None:
            return value
        if len(self._known) >= self._limit:
            return OTHER
        value = model[:MODEL_LABEL_MAX_CHARS]
        self._known[model] = value
        return value


class Buckets:
    """One histogram child: per-bucket counts (the last is +Inf) and the sum."""

    __slots__ = ("edges", "counts", "total")

    def __init__(self, edges: tuple[float, ...]) -> None:
        self.edges = edges
        self.counts = [0] * (len(edges) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.edges, value)] += 1  # first edge >= value: le semantics
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running = 0
        out = []
        for edge, count in zip((*self.edges, float("inf")), self.counts):
            running += count
            out.append((floatToGoString(edge), running))
        return out


class Latency:
    """Latency histograms of one (upstream, model)."""

    __slots__ = ("ttfb", "duration")

    def __init__(self) -> None:
        self.ttfb = Buckets(LATENCY_BUCKETS_SECONDS)
        self.duration = Buckets(LATENCY_BUCKETS_SECONDS)


class Tally:
    """Everything counted for one (upstream, model, tenant)."""

    __slots__ = ("requests", "prompt_tokens", "output_tokens", "images", "energy", "co2e", "embodied",
                 "energy_per_request", "co2e_per_request", "latency")  # fmt: skip

    def __init__(self, latency: Latency) -> None:
        self.requests: dict[str, int] = {}  # by outcome
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.images = 0
        self.energy = 0.0
        self.co2e = 0.0
        self.embodied = 0.0
        self.energy_per_request = Buckets(ENERGY_BUCKETS_JOULES)
        self.co2e_per_request = Buckets(CO2E_BUCKETS_GRAMS)
        self.latency = latency


class RequestMetrics(Collector):
    """Per-request counters and histograms: `record` is the `ProxyServer.on_record`
    listener, `collect` turns the tallies into metric families at scrape time."""

    def __init__(self, tenant_label: Callable[[str], str], models: ModelLabels) -> None:
        self._tenant_label = tenant_label
        self._models = models
        self._tallies: dict[tuple[str, str, str], Tally] = {}
        self._latency: dict[tuple[str, str], Latency] = {}
        self.overhead: dict[str, Buckets] = {}
        # Every reason from zero, so rate() and alerts see the series before the first one.
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)

    def bound(self, upstream: str, model: str | None, tenant: str) -> Tally:
        key = (upstream, self._models.label(model), self._tenant_label(tenant))
        tally = self._tallies.get(key)
        if tally is None:
            # Both folds are bounded, so these dicts are too.
            latency = self._latency.get(key[:2])
            if latency is None:
                latency = self._latency[key[:2]] = Latency()
            tally = self._tallies[key] = Tally(latency)
        return tally

    def record(self, receipt: Receipt, figures: Figures | None, exchange: MeteredExchange | None = None) -> None:
        """Cheap and never raises on odd values (a negative float residue is clamped)."""
        tally = self.bound(receipt.upstream, receipt.model, receipt.tenant)
        if receipt.status == "final":
            energy = receipt.energy_joules if receipt.energy_joules > 0 else 0.0
            co2e = receipt.co2e_grams if receipt.co2e_grams > 0 else 0.0
            tally.energy += energy
            tally.co2e += co2e
            tally.embodied += receipt.embodied_grams if receipt.embodied_grams > 0 else 0.0
            tally.energy_per_request.observe(energy)
            tally.co2e_per_request.observe(co2e)
            return
        tally.requests[receipt.outcome] = tally.requests.get(receipt.outcome, 0) + 1
        tally.prompt_tokens += receipt.prompt_tokens or 0
        tally.output_tokens += receipt.output_tokens or 0
        tally.images += receipt.images or 0
        ttfb = receipt.time_to_first_byte_seconds
        if ttfb is not None:
            tally.latency.ttfb.observe(ttfb if ttfb > 0 else 0.0)
        tally.latency.duration.observe(receipt.duration_seconds if receipt.duration_seconds > 0 else 0.0)

    def reject(self, kind: str) -> None:
        """A request the proxy answered itself; `kind` is one of a few fixed error types."""
        if kind in self.rejected:  # a fixed set: label cardinality stays bounded
            self.rejected[kind] += 1

    def observe_overhead(self, upstream: str, seconds: float) -> None:
        buckets = self.overhead.get(upstream)
        if buckets is None:
            buckets = self.overhead[upstream] = Buckets(OVERHEAD_BUCKETS_SECONDS)
        buckets.observe(seconds if seconds > 0 else 0.0)

    # -- exposition ----------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return ()  # families are built per scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "carbon_proxy_requests", "Requests forwarded to an upstream, by how they ended.", labels=[*REQUEST_LABELS, "outcome"]
        )
        tokens = CounterMetricFamily(
            "carbon_proxy_tokens", "Tokens processed, by type: prompt (input) or output (generated).", labels=[*REQUEST_LABELS, "type"]
        )
        images = CounterMetricFamily("carbon_proxy_images", "Images generated (diffusion requests).", labels=REQUEST_LABELS)
        energy = CounterMetricFamily(
            "carbon_proxy_request_energy_joules",
            "IT energy attributed to requests, before PUE; counted when the figure is final.", labels=REQUEST_LABELS,
        )  # fmt: skip
        co2e = CounterMetricFamily(
            "carbon_proxy_request_co2e_grams",
            "CO2e of requests, operational (energy x PUE x grid intensity) plus embodied; counted when final.",
            labels=REQUEST_LABELS,
        )  # fmt: skip
        embodied = CounterMetricFamily(
            "carbon_proxy_request_embodied_co2e_grams",
            "The embodied (hardware manufacturing) part of carbon_proxy_request_co2e_grams_total.", labels=REQUEST_LABELS,
        )  # fmt: skip
        energy_hist = HistogramMetricFamily(
            "carbon_proxy_per_request_energy_joules", "Final IT energy of each request.", labels=REQUEST_LABELS
        )
        co2e_hist = HistogramMetricFamily(
            "carbon_proxy_per_request_co2e_grams", "Final CO2e (operational plus embodied) of each request.", labels=REQUEST_LABELS
        )
        for key, tally in list(self._tallies.items()):
            labels = list(key)
            for outcome, count in tally.requests.items():
                requests.add_metric([*labels, outcome], count)
            tokens.add_metric([*labels, "prompt"], tally.prompt_tokens)
            tokens.add_metric([*labels, "output"], tally.output_tokens)
            images.add_metric(labels, tally.images)
            energy.add_metric(labels, tally.energy)
            co2e.add_metric(labels, tally.co2e)
            embodied.add_metric(labels, tally.embodied)
            energy_hist.add_metric(labels, tally.energy_per_request.cumulative(), tally.energy_per_request.total)
            co2e_hist.add_metric(labels, tally.co2e_per_request.cumulative(), tally.co2e_per_request.total)
        ttfb = HistogramMetricFamily(
            "carbon_proxy_time_to_first_byte_seconds",
            "From the request accepted (body read) to the upstream's response headers.", labels=LATENCY_LABELS,
        )  # fmt: skip
        duration = HistogramMetricFamily(
            "carbon_proxy_request_duration_seconds", "From the request accepted to the end of the response.", labels=LATENCY_LABELS
        )
        for key, latency in list(self._latency.items()):
            ttfb.add_metric(list(key), latency.ttfb.cumulative(), latency.ttfb.total)
            duration.add_metric(list(key), latency.duration.cumulative(), latency.duration.total)
        overhead = HistogramMetricFamily(
            "carbon_proxy_overhead_seconds",
            "Proxy time before the upstream call: routing, dialect, attribution and header work (body read excluded).",
            labels=["upstream"],
        )  # fmt: skip
        for upstream, buckets in list(self.overhead.items()):
            overhead.add_metric([upstream], buckets.cumulative(), buckets.total)
        rejected = CounterMetricFamily(
            "carbon_proxy_rejected_requests",
            "Requests the proxy answered itself without an upstream (bad target, no route, too large, budget).",
            labels=["reason"],
        )
        for reason, count in list(self.rejected.items()):
            rejected.add_metric([reason], count)
        yield from (requests, tokens, images, energy, co2e, embodied, energy_hist, co2e_hist, ttfb, duration, overhead, rejected)


def install_metrics(proxy: ProxyServer, registry: CollectorRegistry) -> RequestMetrics:
    """Register every carbon-proxy metric on `registry` and subscribe to the proxy.
    Called by `Service` after `ProxyServer.start()` and before the listener binds."""
    configured_models = [m for upstream in proxy.config.upstreams for m in upstream.models]
    requests = RequestMetrics(proxy.tenancy.label, ModelLabels(configured_models))
    proxy.on_record(requests.record)
    registry.register(requests)
    registry.register(StateCollector(proxy))
    registry.register(ReceiptsCollector(proxy))
    try:
        ProcessCollector(registry=registry)  # process_cpu_seconds_total: the proxy's CPU cost
    except ValueError:
        pass  # someone registered process metrics on this registry already
    # Overhead: from the request accepted (body read, which a slow client paces) to the
    # hand-off to the upstream: routing, dialect, budget, attribution and header work.
    proxy.on_forward(lambda exchange: requests.observe_overhead(exchange.upstream.name, time.monotonic() - exchange.meta.started_monotonic))
    proxy.on_reject(requests.reject)
    routes = RouteMetrics(proxy.config.routing.policy, proxy.config.routing.baseline, (u.name for u in proxy.config.upstreams))
    proxy.on_record(routes.record)
    registry.register(routes)
    return requests
