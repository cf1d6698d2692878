"""A scripted grid for tests and the bench: intensity steps on a clock the test controls.

It is both an IntensityProvider (what the accountant charges a request at) and a
ForecastSource (what the scheduler plans with), so a batch moved to a clean window is
charged that window's intensity.
"""

from __future__ import annotations

from proxy.batches.clock import Clock
from proxy.carbon.forecast import ForecastWindow, windows_from_points
from proxy.carbon.intensity import IntensityReading


class ScriptedGrid:
    def __init__(self, clock: Clock, points: list[tuple[float, float]]) -> None:
        """`points`: sorted (valid_from_unix, g_per_kwh), each lasting until the next."""
        self.clock = clock
        self.points = sorted(points)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def value_at(self, unix: float) -> float:
        value = self.points[0][1]
        for start, g in self.points:
            if start <= unix:
                value = g
        return value

    def current(self) -> IntensityReading:
        return self.at(self.clock.now())

    def at(self, unix_seconds: float) -> IntensityReading:
        # The accountant asks at wall-clock time; the script runs on the test's clock.
        return IntensityReading(self.value_at(self.clock.now()), "scripted", estimated=True)

    def forecast(self, now_unix: float, horizon_seconds: float) -> list[ForecastWindow]:
        return windows_from_points([(s, g, True) for s, g in self.points], now_unix, horizon_seconds)
