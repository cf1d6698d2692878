"""Metrics read at scrape time from the meter, the attribution engine and the grid.

A custom collector: the engine and sampler already keep running totals, so a scrape
reads them instead of the hot path copying them into gauges. Each section is guarded:
a failing read drops that section from one scrape, never the whole scrape.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy.accounting import JOULES_PER_KWH
from proxy.app import ProxyServer, group_name

log = logging.getLogger("carbon_proxy.metrics")


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


class StateCollector(Collector):
    def __init__(self, proxy: ProxyServer) -> None:
        self._proxy = proxy
        # PUE per device group, as the accountant prices it (the first upstream's wins,
        # as several upstreams on one group share the same devices and building).
        self._group_pue: dict[str, float] = {}
        for upstream in proxy.config.upstreams:
            pue = upstream.pue if upstream.pue is not None else proxy.config.pue
            self._group_pue.setdefault(group_name(upstream), pue)

    def describe(self) -> Iterable[Metric]:
        return ()  # names are dynamic per scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        sections: tuple[Callable[[], list[Metric]], ...] = (self._energy, self._devices, self._meter, self._intensity, self._receipts)
        for section in sections:
            try:
                metrics = section()
            except Exception:
                log.exception("metrics section %s failed", section.__name__)
                continue
            yield from metrics

    # -- attribution: measured = attributed + idle (+ still settling) -------------------

    def _energy(self) -> list[Metric]:
        accountant = self._proxy.accountant
        if accountant is None:
            return []
        engine = accountant.engine
        measured = _counter("carbon_proxy_measured_energy_joules", "Energy the meter measured on each device group.", ["group"])
        attributed = _counter(
            "carbon_proxy_attributed_energy_joules",
            "Measured energy given to requests (final shares): attributed + idle = measured once settled.", ["group"],
        )  # fmt: skip
        idle = _counter(
            "carbon_proxy_idle_energy_joules", "Static energy while no request was in flight (given to no request).", ["group"]
        )
        idle_seconds = _counter("carbon_proxy_idle_seconds", "Time a device group had no request in flight.", ["group"])
        power = _gauge("carbon_proxy_group_power_watts", "Average power of each device group over the last meter interval.", ["group"])
        idle_power = _gauge(
            "carbon_proxy_idle_power_watts", "Idle (static) power of each device group: configured or learned.", ["group"]
        )
        in_flight = _gauge("carbon_proxy_in_flight_requests", "Requests open on each device group.", ["group"])
        pue = _gauge("carbon_proxy_pue_ratio", "Power usage effectiveness applied to each device group.", ["group"])
        for group, totals in engine.totals().items():
            measured.add_metric([group], totals.measured_joules)
            attributed.add_metric([group], totals.attributed_joules)
            idle.add_metric([group], totals.idle_joules)
            idle_seconds.add_metric([group], totals.idle_seconds)
            power.add_metric([group], engine.last_power_watts(group))
            watts = engine.idle_power_watts(group)
            if watts is not None:
                idle_power.add_metric([group], watts)
            in_flight.add_metric([group], engine.in_flight(group))
            if group in self._group_pue:
                pue.add_metric([group], self._group_pue[group])
        weight = _gauge(
            "carbon_proxy_prefill_weight_ratio", "Cost of a prompt token relative to an output token (configured or learned)."
        )
        weight.add_metric([], engine.prefill_weight)
        return [measured, attributed, idle, idle_seconds, power, idle_power, in_flight, pue, weight]

    # -- devices: the meter's own cumulative counters --------------------------------------

    def _devices(self) -> list[Metric]:
        sampler = self._proxy.sampler
        accountant = self._proxy.accountant
        sample = sampler.last_sample if sampler is not None else None
        if sample is None or accountant is None:
            return []
        engine = accountant.engine
        energy = _counter(
            "carbon_proxy_device_energy_joules", "Cumulative energy each device's meter reports (arbitrary origin).", ["device"]
        )
        power = _gauge(
            "carbon_proxy_device_power_watts",
            "Device power: the meter's own reading where it has one, else its group's power split evenly.", ["device"],
        )  # fmt: skip
        split: dict[str, float] = {}
        for group in engine.group_names:
            devices = engine.group_devices(group)
            for device in devices:
                split[device] = engine.last_power_watts(group) / max(1, len(devices))
        for device, joules in sample.joules_by_device.items():
            energy.add_metric([device], joules)
            watts = sample.power_watts_by_device.get(device, split.get(device))
            if watts is not None:
                power.add_metric([device], watts)
        return [energy, power]

    # -- meter health ----------------------------------------------------------------------

    def _meter(self) -> list[Metric]:
        sampler = self._proxy.sampler
        if sampler is None:
            return []
        meter = self._proxy.meter
        health = sampler.health
        kind = str(meter.kind)
        up = _gauge("carbon_proxy_meter_up", "1 when the last meter read succeeded, else 0.", ["meter", "method"])
        up.add_metric([kind, str(meter.method)], 1.0 if health.ok else 0.0)
        metrics: list[Metric] = [up]
        staleness = health.staleness_seconds()
        if staleness is not None:  # never read: meter_up says so; no made-up age
            stale = _gauge("carbon_proxy_meter_staleness_seconds", "Age of the last good meter reading.", ["meter"])
            stale.add_metric([kind], staleness)
            metrics.append(stale)
        samples = _counter("carbon_proxy_meter_samples", "Good meter readings taken.", ["meter"])
        samples.add_metric([kind], health.samples)
        failures = _counter("carbon_proxy_meter_read_failures", "Meter reads that failed, timed out or were rejected.", ["meter"])
        failures.add_metric([kind], health.total_failures)
        duration = _gauge("carbon_proxy_meter_read_duration_seconds", "Wall time the last meter read took.", ["meter"])
        duration.add_metric([kind], health.sample_seconds)
        return metrics + [samples, failures, duration]

    # -- grid intensity and its provider ---------------------------------------------------

    def _intensity(self) -> list[Metric]:
        provider = self._proxy.intensity
        reading = provider.current()
        intensity = _gauge(
            "carbon_proxy_grid_intensity_grams_per_joule",
            "Grid carbon intensity in use (location-based), gCO2e per joule; x 3.6e6 for g/kWh.", ["source"],
        )  # fmt: skip
        intensity.add_metric([reading.source], reading.g_per_kwh / JOULES_PER_KWH)
        stale = _gauge(
            "carbon_proxy_grid_intensity_stale", "1 when the intensity in use is an old value or the table fallback.", ["source"]
        )
        stale.add_metric([reading.source], 1.0 if reading.stale else 0.0)
        up = _gauge("carbon_proxy_intensity_provider_up", "1 when the intensity source answers (static sources: always).", ["provider"])
        age = _gauge("carbon_proxy_intensity_provider_staleness_seconds", "Age of the provider's last good answer.", ["provider"])
        failures = _gauge("carbon_proxy_intensity_provider_consecutive_failures", "Polls failed since the last success.", ["provider"])
        status_of = getattr(provider, "status", None)
        if callable(status_of):  # a live, polling provider
            status = status_of()
            up.add_metric([status.source], 1.0 if status.healthy else 0.0)
            if status.last_success_unix is not None:
                age.add_metric([status.source], max(0.0, time.time() - status.last_success_unix))
            failures.add_metric([status.source], status.consecutive_failures)
        else:  # constant or offline table: nothing to go stale
            up.add_metric([reading.source], 1.0)
            age.add_metric([reading.source], 0.0)
            failures.add_metric([reading.source], 0.0)
        return [intensity, stale, up, age, failures]

    def _receipts(self) -> list[Metric]:
        # Stores without a writer thread (memory) are always up and never drop poison.
        # Dropped receipts, by reason, are carbon_proxy_receipts_dropped_total (proxy.receipts.metrics).
        store = self._proxy.receipts
        up = _gauge("carbon_proxy_receipts_writer_up", "1 while the receipts writer runs; 0: receipts are no longer written.")
        up.add_metric([], 1.0 if getattr(store, "writer_up", True) else 0.0)
        counters = (
            ("written", "written_total", "Receipt rows written to the database."),
            ("poison", "poison_total", "Receipts that could never be stored (e.g. text that is not UTF-8), dropped alone."),
            ("write_errors", "write_errors_total", "Failed writes of a batch (retried)."),
        )
        metrics: list[Metric] = [up]
        for name, attribute, doc in counters:
            counter = _counter(f"carbon_proxy_receipts_{name}", doc)
            counter.add_metric([], float(getattr(store, attribute, 0)))
            metrics.append(counter)
        return metrics
