"""Simulated grid intensity that moves through the day: one trace per zone (`provider = "sim"`).

For the demo, tests and bench/routing.py: a carbon-aware router needs intensity that
changes, with the swings real grids have. Each zone is an hourly daily shape (UTC hour
0..23, gCO2e/kWh, linear in between) plus, for wind-heavy grids, slow swings over hours.
The shapes follow the typical day seen in published hourly data, rounded; they are
illustrations of those shapes, not the data:
- US-CAL-CISO: CAISO's "duck curve" (CAISO Today's Outlook, hourly CO2): solar pulls the
  midday intensity to about a third of the evening peak around 19:00 local (02:00 UTC).
- DE: Agora Energiewende's Agorameter / Electricity Maps DE: lignite and gas at night and
  in the evening, a solar dip at midday, and wind moving the whole level by +-100 g.
- DK-DK1: Energinet's hourly CO2 emission data (via Electricity Maps): wind decides,
  swinging between ~50 and ~350 over half a day.
- SE, FR: Svenska kraftnät / RTE eCO2mix: hydro and nuclear, low and nearly flat.
- PL: PSE's hourly mix: coal, high all day with a small solar dip.
`day_seconds` compresses a day (the bench runs one in minutes); forecasts are exact,
since the trace is known ahead.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from proxy.carbon.forecast import ForecastWindow
from proxy.carbon.intensity import IntensityReading
from proxy.errors import ConfigError

HOURLY_SHAPES: dict[str, tuple[float, ...]] = {
    # UTC hours 0..23; California is UTC-8: its 19:00 evening peak is 03:00 UTC, noon is 20:00 UTC.
    "US-CAL-CISO": (300, 320, 325, 310, 290, 270, 260, 255, 250, 245, 240, 235,
                    230, 230, 240, 250, 200, 140, 100, 85, 80, 90, 130, 220),
    "DE": (420, 410, 400, 395, 400, 420, 440, 430, 380, 320, 280, 260,
           255, 265, 300, 360, 420, 470, 480, 470, 455, 445, 435, 425),
    "DK-DK1": (150, 150, 150, 150, 150, 155, 165, 170, 165, 155, 145, 140,
               140, 140, 145, 155, 170, 180, 180, 175, 165, 160, 155, 150),
    "SE": (32, 31, 30, 30, 31, 34, 38, 41, 42, 41, 39, 37,
           36, 36, 37, 39, 42, 45, 46, 44, 40, 37, 35, 33),
    "FR": (52, 50, 48, 47, 48, 52, 60, 66, 64, 58, 52, 48,
           46, 46, 48, 54, 62, 72, 78, 74, 66, 60, 56, 54),
    "PL": (690, 685, 680, 680, 685, 700, 720, 715, 690, 660, 640, 630,
           628, 635, 650, 680, 710, 730, 735, 725, 710, 700, 695, 692),
}
WIND_SWING_G_PER_KWH: dict[str, float] = {"DE": 90.0, "DK-DK1": 120.0}
"""Amplitude of the slow wind-driven swings (periods of 7 h and 17 h, so days differ)."""

ALIASES = {"CAISO": "US-CAL-CISO", "US-CA": "US-CAL-CISO", "DK": "DK-DK1", "DEU": "DE", "SWE": "SE", "FRA": "FR", "POL": "PL"}


def sim_zone(zone: str, key: str = "carbon.zone") -> str:
    name = ALIASES.get(zone.upper(), zone.upper())
    if name not in HOURLY_SHAPES:
        raise ConfigError(key, f"no simulated trace for zone {zone!r}; sim zones: {', '.join(sorted(HOURLY_SHAPES))}")
    return name


class TraceIntensity:
    """An IntensityProvider (and ForecastSource) that follows a zone's daily trace."""

    def __init__(
        self,
        zone: str,
        *,
        day_seconds: float = 86400.0,
        origin_unix: float = 0.0,
        clock: Callable[[], float] = time.time,
        key: str = "carbon.zone",
    ) -> None:
        if not day_seconds > 0:
            raise ConfigError("carbon.day_seconds", f"must be greater than 0, got {day_seconds!r}")
        self.zone = sim_zone(zone, key)
        self._shape = HOURLY_SHAPES[self.zone]
        self._wind = WIND_SWING_G_PER_KWH.get(self.zone, 0.0)
        self.day_seconds = float(day_seconds)
        self.origin_unix = float(origin_unix)
        """The moment the simulated day starts (UTC midnight of the trace)."""
        self._clock = clock
        self.source = f"sim:{self.zone}"

    def hours(self, unix_seconds: float) -> float:
        """Simulated hours since the origin."""
        return (unix_seconds - self.origin_unix) / self.day_seconds * 24.0

    def g_per_kwh(self, unix_seconds: float) -> float:
        hours = self.hours(unix_seconds)
        hour = hours % 24.0
        low = int(hour)
        frac = hour - low
        value = self._shape[low] * (1 - frac) + self._shape[(low + 1) % 24] * frac
        if self._wind:
            # Two slow, incommensurate swings: windy and calm spells that do not repeat daily.
            value -= self._wind * (0.6 * math.sin(2 * math.pi * hours / 7.0) + 0.4 * math.sin(2 * math.pi * hours / 17.0 + 1.0))
        return max(5.0, value)

    async def start(self) -> None:
        return None

    def current(self) -> IntensityReading:
        return self.at(self._clock())

    def at(self, unix_seconds: float) -> IntensityReading:
        return IntensityReading(g_per_kwh=self.g_per_kwh(unix_seconds), source=self.source, valid_from_unix=unix_seconds)

    def forecast(self, now_unix: float, horizon_seconds: float) -> list[ForecastWindow]:
        """Exact: one window per simulated hour, at that hour's mean value (midpoint)."""
        step = self.day_seconds / 24.0
        end = now_unix + max(0.0, horizon_seconds)
        windows: list[ForecastWindow] = []
        start = now_unix
        while start < end:
            boundary = self.origin_unix + (math.floor((start - self.origin_unix) / step) + 1) * step
            stop = min(boundary, end)
            windows.append(ForecastWindow(start, stop, self.g_per_kwh((start + stop) / 2), False))
            start = stop
        return windows

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"TraceIntensity({self.zone!r}, day_seconds={self.day_seconds:g})"
