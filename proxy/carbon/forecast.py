"""Intensity forecasts: one interface for the router (where) and the batch scheduler (when).

    forecast_of(provider, now_unix, horizon_seconds) -> list[ForecastWindow]

A window is `(start_unix, end_unix, g_per_kwh)` (a NamedTuple, so it unpacks as a plain
tuple). Windows are sorted, do not overlap, and together cover `[now, now + horizon)`
as far as the source knows; the first one holds `now`. A source without a forecast (a
constant, the offline table) answers one flat window over the whole horizon: "no
forecast" reads as "no better time", so a scheduler runs now. A live provider answers
from the points it has cached (never the network): the current point, then the
forecast points it publishes (Electricity Maps `/carbon-intensity/forecast`, WattTime
`horizon_hours`, UK Carbon Intensity `fw24h`, Carbon Aware SDK forecasts), each lasting
until the next; past the last point the last value is held (flagged `estimated`).

This module's signature is a contract other packages depend on: extend, do not change.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

from proxy.carbon.intensity import IntensityProvider


class ForecastWindow(NamedTuple):
    start_unix: float
    end_unix: float
    g_per_kwh: float
    estimated: bool = True
    """False only for a measured value (the current point of a source that measures)."""


@runtime_checkable
class ForecastSource(Protocol):
    def forecast(self, now_unix: float, horizon_seconds: float) -> list[ForecastWindow]:
        """Windows covering [now, now + horizon); cached data only, never blocks or raises."""
        ...


def flat(g_per_kwh: float, now_unix: float, horizon_seconds: float, *, estimated: bool = False) -> list[ForecastWindow]:
    """The forecast of a source that does not move: one window, the whole horizon."""
    return [ForecastWindow(now_unix, now_unix + max(0.0, horizon_seconds), g_per_kwh, estimated)]


def windows_from_points(
    points: list[tuple[float, float, bool]],
    now_unix: float,
    horizon_seconds: float,
) -> list[ForecastWindow]:
    """Step windows from sorted `(valid_from_unix, g_per_kwh, estimated)` points.

    Each point lasts until the next; the point in force at `now` opens the first window;
    the last point is held to the horizon. Empty input gives an empty list.
    """
    end = now_unix + max(0.0, horizon_seconds)
    windows: list[ForecastWindow] = []
    for index, (start, value, estimated) in enumerate(points):
        stop = points[index + 1][0] if index + 1 < len(points) else end
        lo, hi = max(start, now_unix), min(stop, end)
        if hi > lo:
            windows.append(ForecastWindow(lo, hi, value, estimated))
    if windows and windows[0].start_unix > now_unix:
        # The source knows nothing before its first point: hold that value back to now.
        first = windows[0]
        windows[0] = ForecastWindow(now_unix, first.end_unix, first.g_per_kwh, True)
    return windows


def forecast_of(provider: IntensityProvider, now_unix: float, horizon_seconds: float) -> list[ForecastWindow]:
    """The provider's forecast when it publishes one, else its current value held flat."""
    if isinstance(provider, ForecastSource):
        try:
            windows = provider.forecast(now_unix, horizon_seconds)
        except Exception:  # a forecast is advice: never fail a caller over it
            windows = []
        if windows:
            return windows
    reading = provider.at(now_unix)
    return flat(reading.g_per_kwh, now_unix, horizon_seconds, estimated=reading.estimated or reading.stale)
