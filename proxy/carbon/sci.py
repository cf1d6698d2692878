"""Energy to grams: SCI (ISO/IEC 21031:2024) per request, per 1k output tokens, per image.

CO2e(request) = E x PUE x I + M. Pure functions, plus the helper that prices a long
stream interval by interval so a stream crossing a data-point boundary uses both values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from proxy.carbon.intensity import IntensityProvider, IntensityReading

JOULES_PER_KWH = 3_600_000.0


def kwh_from_joules(energy_joules: float) -> float:
    return energy_joules / JOULES_PER_KWH


def operational_grams(energy_joules: float, pue: float, g_per_kwh: float) -> float:
    """Scope 2, location-based: IT energy x PUE x grid intensity."""
    return energy_joules / JOULES_PER_KWH * pue * g_per_kwh


def sci_per_1k_tokens(total_grams: float, output_tokens: int) -> float | None:
    """Grams per 1,000 output tokens; None when the request produced none."""
    return total_grams * 1000.0 / output_tokens if output_tokens > 0 else None


def per_image(total_grams: float, images: int) -> float | None:
    """Grams per generated image; None when there were none."""
    return total_grams / images if images > 0 else None


@dataclass(frozen=True, slots=True)
class Emissions:
    """The figures one request reports (headers, stream trailer, receipt, metrics)."""

    energy_joules: float
    """IT energy before PUE (X-Energy-Joules)."""
    pue: float
    g_per_kwh: float
    """Grid intensity used, energy-weighted over the request (X-Carbon-Intensity)."""
    operational_grams: float
    """E x PUE x I (Carbon-Emissions-Scope-2)."""
    embodied_grams: float
    """M (X-CO2e-Embodied-Grams)."""
    intensity: IntensityReading
    """Which intensity value(s) were used, for the basis."""

    @property
    def total_grams(self) -> float:
        """X-CO2e-Grams: operational + embodied."""
        return self.operational_grams + self.embodied_grams

    def per_1k_output_tokens(self, output_tokens: int) -> float | None:
        return sci_per_1k_tokens(self.total_grams, output_tokens)

    def per_image(self, images: int) -> float | None:
        return per_image(self.total_grams, images)

    def basis(self) -> str:
        """The `intensity=...; pue=...` part of X-Emissions-Basis."""
        return f"{self.intensity.basis()}; pue={self.pue:g}"

    def as_dict(self) -> dict[str, object]:
        return {
            "energy_joules": self.energy_joules,
            "co2e_grams": self.total_grams,
            "operational_grams": self.operational_grams,
            "embodied_grams": self.embodied_grams,
            "carbon_intensity_g_per_kwh": self.g_per_kwh,
            "pue": self.pue,
            "basis": self.basis(),
        }


def emissions(energy_joules: float, pue: float, reading: IntensityReading, embodied_grams: float = 0.0) -> Emissions:
    """Emissions for energy priced at one intensity reading."""
    return Emissions(
        energy_joules=energy_joules,
        pue=pue,
        g_per_kwh=reading.g_per_kwh,
        operational_grams=operational_grams(energy_joules, pue, reading.g_per_kwh),
        embodied_grams=embodied_grams,
        intensity=reading,
    )


Segment = tuple[float, float, float]
"""(t0_unix, t1_unix, joules): energy attributed to a request over a wall-clock interval."""


def _split(provider: IntensityProvider, t0: float, t1: float) -> list[tuple[float, float]]:
    if t1 <= t0:
        return [(t0, t0)]
    finder = getattr(provider, "change_points", None)
    cuts = [c for c in finder(t0, t1) if t0 < c < t1] if callable(finder) else []
    edges = [t0, *sorted(cuts), t1]
    return list(zip(edges, edges[1:]))


def combine_readings(readings: Sequence[IntensityReading], weights: Sequence[float]) -> IntensityReading:
    """One reading describing several: weighted mean value, every source named, any flag kept."""
    if not readings:
        raise ValueError("no readings to combine")
    total = sum(weights)
    if total > 0:
        mean = sum(r.g_per_kwh * w for r, w in zip(readings, weights)) / total
    else:
        mean = sum(r.g_per_kwh for r in readings) / len(readings)
    sources = list(dict.fromkeys(r.source for r in readings))
    return IntensityReading(
        g_per_kwh=mean,
        source="+".join(sources),
        stale=any(r.stale for r in readings),
        estimated=any(r.estimated for r in readings),
        marginal=any(r.marginal for r in readings),
        valid_from_unix=readings[0].valid_from_unix,
    )


def emissions_over_intervals(
    segments: Iterable[Segment],
    pue: float,
    provider: IntensityProvider,
    embodied_grams: float = 0.0,
) -> Emissions:
    """Price each interval at the intensity that applied then.

    Each segment is cut where the provider's value changes (when it can say where, via
    `change_points`), its joules split in proportion to time (constant power within a
    segment), and each piece priced at the value at its midpoint.
    """
    total_joules = 0.0
    grams = 0.0
    readings: list[IntensityReading] = []
    weights: list[float] = []
    for t0, t1, joules in segments:
        pieces = _split(provider, float(t0), float(t1))
        span = float(t1) - float(t0)
        for a, b in pieces:
            share = joules * ((b - a) / span) if span > 0 else joules
            reading = provider.at((a + b) / 2.0)
            grams += operational_grams(share, pue, reading.g_per_kwh)
            total_joules += share
            readings.append(reading)
            weights.append(share)
    if not readings:
        reading = provider.current()
        return emissions(0.0, pue, reading, embodied_grams)
    combined = combine_readings(readings, weights)
    # The mean reported is the one that reproduces the grams: grams = kWh x PUE x mean.
    if total_joules > 0 and pue > 0:
        combined = IntensityReading(
            g_per_kwh=grams / (total_joules / JOULES_PER_KWH * pue),
            source=combined.source,
            stale=combined.stale,
            estimated=combined.estimated,
            marginal=combined.marginal,
            valid_from_unix=combined.valid_from_unix,
        )
    return Emissions(
        energy_joules=total_joules,
        pue=pue,
        g_per_kwh=combined.g_per_kwh,
        operational_grams=grams,
        embodied_grams=embodied_grams,
        intensity=combined,
    )
