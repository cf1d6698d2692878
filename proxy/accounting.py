"""From attributed joules to the figures a caller sees (DESIGN.md section 3).

Attribution gives joules and reserved time per request; this module prices them with
PUE, grid intensity (per interval) and embodied carbon, and formats the result as
headers and as the JSON object placed at the end of streams and in receipts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

from proxy.attribution import AttributionEngine, RequestUsage
from proxy.carbon.intensity import IntensityProvider

JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True, slots=True)
class Figures:
    energy_joules: float
    """IT energy attributed to the request, before PUE."""
    operational_grams: float
    """energy x PUE x grid intensity (SCI 'E x I'; IETF Carbon-Emissions-Scope-2)."""
    embodied_grams: float
    """The request's share of the hardware's embodied carbon (SCI 'M')."""
    intensity_g_per_kwh: float
    pue: float
    basis: str
    final: bool

    @property
    def co2e_grams(self) -> float:
        return self.operational_grams + self.embodied_grams

    @property
    def status(self) -> str:
        return "final" if self.final else "provisional"

    def headers(self) -> dict[str, str]:
        return {
            "X-Energy-Joules": _fmt(self.energy_joules),
            "X-CO2e-Grams": _fmt(self.co2e_grams),
            "X-CO2e-Embodied-Grams": _fmt(self.embodied_grams),
            "X-Carbon-Intensity": _fmt(self.intensity_g_per_kwh),
            "Carbon-Emissions-Scope-2": _fmt(self.operational_grams),
            "X-Emissions-Basis": self.basis,
        }

    def as_json(self) -> dict[str, Any]:
        """The same fields as the headers, for streams and receipts."""
        return {
            "energy_joules": round(self.energy_joules, 6),
            "co2e_grams": round(self.co2e_grams, 9),
            "co2e_embodied_grams": round(self.embodied_grams, 9),
            "carbon_intensity_g_per_kwh": round(self.intensity_g_per_kwh, 3),
            "carbon_emissions_scope_2_grams": round(self.operational_grams, 9),
            "pue": self.pue,
            "basis": self.basis,
            "status": self.status,
        }


def _fmt(value: float) -> str:
    # Enough significant digits for milligram-scale figures, no exponent surprises.
    return f"{value:.6g}" if value >= 1e-4 or value == 0 else f"{value:.3e}"


@dataclass(frozen=True, slots=True)
class GroupPricing:
    pue: float
    embodied_g_per_device_second: float
    devices: int
    intensity: IntensityProvider | None = None
    """The group's own grid intensity (an upstream with its own zone); None: the proxy's."""


class Accountant:
    """Prices attributed energy. Knows the clock mapping, intensity, PUE and embodied rates."""

    def __init__(
        self,
        engine_factory: Callable[[Callable[[float], float], Callable[[RequestUsage], None]], AttributionEngine],
        intensity: IntensityProvider,
        pricing: dict[str, GroupPricing],
        meter_basis: Callable[[], str],
        settle_seconds: float = 0.0,
    ) -> None:
        self._intensity = intensity
        self.settle_seconds = settle_seconds
        """How long a response's last bytes may wait for the meter to cover its end."""
        self._sample_waiters: list[asyncio.Future[None]] = []
        self._pricing = pricing
        self._meter_basis = meter_basis
        # Attribution runs on the monotonic clock; intensity data points are wall-clock.
        self._wall_offset = time.time() - time.monotonic()
        self._final_listeners: list[Callable[[RequestUsage, Figures], None]] = []
        self._modelled: Callable[[RequestUsage], float] | None = None
        self.engine = engine_factory(self._g_per_kwh_at, self._finalized)

    def _g_per_kwh_at(self, monotonic_seconds: float) -> float:
        return self._intensity.at(monotonic_seconds + self._wall_offset).g_per_kwh

    def model_work(self, modelled_joules: Callable[[RequestUsage], float]) -> None:
        """A modelled meter (estimate) books a request's energy only once its work is known,
        after the figure at the end of the response was computed: that figure would say
        0 J. With this, a provisional figure is at least the request's modelled energy."""
        self._modelled = modelled_joules

    def sampled(self) -> None:
        """The engine took a meter sample: wake whoever waits for one (settle_ms)."""
        waiters, self._sample_waiters = self._sample_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def covered(self, usage: RequestUsage) -> None:
        """Wait, at most settle_seconds, until a meter sample covers the request's end, so
        that its figure at the end of the response is measured, not predicted."""
        end = usage.closed_at
        if self.settle_seconds <= 0 or end is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settle_seconds
        while self.engine.last_sample_seconds(usage.group) < end:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._sample_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                return

    def on_final(self, listener: Callable[[RequestUsage, Figures], None]) -> None:
        self._final_listeners.append(listener)

    def _finalized(self, usage: RequestUsage) -> None:
        figures = self.figures(usage, now=usage.closed_at or time.monotonic())
        for listener in self._final_listeners:
            listener(usage, figures)

    def figures(self, usage: RequestUsage, now: float) -> Figures:
        pricing = self._pricing[usage.group]
        if usage.final:
            joules, weighted, reserved = usage.energy_joules, usage.weighted_joules, usage.reserved_seconds
        else:
            joules, weighted, reserved = self.engine.provisional(usage, now)
            if self._modelled is not None:
                modelled = self._modelled(usage)
                if modelled > joules:
                    weighted += (modelled - joules) * self._g_per_kwh_at(usage.closed_at or now)
                    joules = modelled
        own = pricing.intensity
        reading = (own or self._intensity).at((usage.closed_at or now) + self._wall_offset)
        if own is not None:
            # An upstream in its own zone: priced at its zone's value when it ended (the
            # engine's per-interval weighting follows the proxy-wide source only).
            weighted = joules * reading.g_per_kwh
        # weighted = sum of joules x g/kWh of each interval: a long stream that crosses an
        # intensity data point is priced with both values.
        operational = weighted / JOULES_PER_KWH * pricing.pue
        intensity = weighted / joules if joules > 0 else reading.g_per_kwh
        embodied = reserved * pricing.devices * pricing.embodied_g_per_device_second
        status = "final" if usage.final else "provisional"
        basis = f"{self._meter_basis()}; {reading.basis()}; pue={pricing.pue:g}; status={status}"
        return Figures(
            energy_joules=joules,
            operational_grams=operational,
            embodied_grams=embodied,
            intensity_g_per_kwh=intensity,
            pue=pricing.pue,
            basis=basis,
            final=usage.final,
        )
