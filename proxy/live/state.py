"""What the live page shows besides requests: power per device group, grid intensity,
meter health. Read from the same objects proxy.metrics_state reads at scrape time."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from proxy.app import ProxyServer, group_name

log = logging.getLogger("carbon_proxy.live")

POWER_WINDOW_SECONDS = 30.0
"""Power is averaged over this much of the cumulative counters: one meter interval is
too jumpy to read, and attribution settles a little after the energy is measured."""


MIN_SPACING_SECONDS = 0.5
"""Readings closer than this are not kept apart (two pages asking at once share one)."""
MIN_RATE_SECONDS = 5.0
"""No rate from less history than this: attribution settles a little after the energy is
measured, so a window of a second or two can show more attributed than measured power.
The page shows a dash until then."""


class PowerTracker:
    """Measured, attributed and idle power per device group, from the attribution
    engine's cumulative joules: the difference of two readings over their time apart."""

    def __init__(self, window_seconds: float = POWER_WINDOW_SECONDS) -> None:
        self._window_seconds = window_seconds
        self._history: deque[tuple[float, dict[str, tuple[float, float, float]]]] = deque()

    def update(self, proxy: ProxyServer, now: float | None = None) -> list[dict[str, Any]]:
        accountant = proxy.accountant
        if accountant is None:
            return []
        engine = accountant.engine
        now = now if now is not None else time.monotonic()
        totals = {g: (t.measured_joules, t.attributed_joules, t.idle_joules) for g, t in engine.totals().items()}
        if not self._history or now - self._history[-1][0] >= MIN_SPACING_SECONDS:
            self._history.append((now, totals))  # two pages asking at once share one point
        while len(self._history) > 2 and now - self._history[1][0] >= self._window_seconds:
            self._history.popleft()
        then, old = self._history[0]
        elapsed = now - then
        upstreams: dict[str, list[str]] = {}
        for upstream in proxy.config.upstreams:
            upstreams.setdefault(group_name(upstream), []).append(upstream.name)
        groups = []
        for group, (measured, attributed, idle) in totals.items():
            before = old.get(group, (measured, attributed, idle))
            groups.append(
                {
                    "group": group,
                    "upstreams": upstreams.get(group, []),
                    "devices": list(engine.group_devices(group)),
                    "measured_watts": _watts(measured, before[0], elapsed),
                    "attributed_watts": _watts(attributed, before[1], elapsed),
                    "idle_watts": _watts(idle, before[2], elapsed),
                    "power_watts_now": engine.last_power_watts(group),
                    "idle_power_watts": engine.idle_power_watts(group),
                    "in_flight": engine.in_flight(group),
                    "window_seconds": elapsed,
                }
            )
        return groups


def _watts(joules_now: float, joules_then: float, elapsed_seconds: float) -> float | None:
    if elapsed_seconds < MIN_RATE_SECONDS:
        return None
    return max(0.0, joules_now - joules_then) / elapsed_seconds


def grid_state(proxy: ProxyServer) -> dict[str, Any]:
    reading = proxy.intensity.current()
    state: dict[str, Any] = {
        "g_per_kwh": reading.g_per_kwh,
        "source": reading.source,
        "stale": reading.stale,
        "estimated": reading.estimated,
        "marginal": reading.marginal,
        "pue": proxy.config.pue,
    }
    status_of = getattr(proxy.intensity, "status", None)
    if callable(status_of):  # a polling provider: is it answering?
        status = status_of()
        state["provider_healthy"] = bool(status.healthy)
        state["consecutive_failures"] = int(status.consecutive_failures)
    return state


def meter_state(proxy: ProxyServer) -> dict[str, Any]:
    """Health only: the last error text stays on /readyz (it may name hosts and paths)."""
    meter = proxy.meter
    state: dict[str, Any] = {"kind": str(meter.kind), "method": str(meter.method)}
    sampler = proxy.sampler
    if sampler is None:
        return {**state, "ok": False, "staleness_seconds": None, "samples": 0, "failures": 0}
    health = sampler.health
    return {
        **state,
        "ok": health.ok,
        "staleness_seconds": health.staleness_seconds(),
        "samples": health.samples,
        "failures": health.total_failures,
        "consecutive_failures": health.consecutive_failures,
    }


def snapshot(proxy: ProxyServer, power: PowerTracker) -> dict[str, Any]:
    """Each section guarded: one failing read blanks that section, never the page."""
    out: dict[str, Any] = {"time_unix": time.time()}
    for name, read in (("groups", lambda: power.update(proxy)), ("grid", lambda: grid_state(proxy)), ("meter", lambda: meter_state(proxy))):
        try:
            out[name] = read()
        except Exception:
            log.exception("live page: reading %s failed", name)
            out[name] = None
    return out
