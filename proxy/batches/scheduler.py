"""When to run a batch: the cleanest stretch of its forecast that fits before the deadline.

A batch runs as one block of `duration_seconds` (its lines at the configured concurrency,
at the throughput seen lately). Every start from now to the latest safe start
(deadline - safety margin - duration) is a candidate; the one whose block has the lowest
mean forecast intensity wins, ties going to the earliest. The mean over a block only
changes slope where a window begins or ends, so the minimum lies at a start that puts a
block edge on a window edge: those few candidates are enough. A flat forecast (none
published) gives every start the same mean: run now.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.carbon.forecast import ForecastWindow


@dataclass(frozen=True, slots=True)
class Plan:
    start_unix: float
    mean_g_per_kwh: float
    """Predicted mean intensity over the block."""
    now_g_per_kwh: float
    """Predicted mean intensity had the block started now."""


def mean_intensity(windows: list[ForecastWindow], start_unix: float, end_unix: float) -> float:
    """Time-weighted mean over [start, end); past the last window its value is held."""
    if not windows:
        return 0.0
    if end_unix <= start_unix:
        return _at(windows, start_unix)
    total = 0.0
    for window in windows:
        lo, hi = max(window.start_unix, start_unix), min(window.end_unix, end_unix)
        if hi > lo:
            total += (hi - lo) * window.g_per_kwh
    covered_to = max(windows[-1].end_unix, start_unix)
    if end_unix > covered_to:
        total += (end_unix - covered_to) * windows[-1].g_per_kwh
    if start_unix < windows[0].start_unix:
        total += (min(end_unix, windows[0].start_unix) - start_unix) * windows[0].g_per_kwh
    return total / (end_unix - start_unix)


def _at(windows: list[ForecastWindow], unix: float) -> float:
    for window in windows:
        if window.start_unix <= unix < window.end_unix:
            return window.g_per_kwh
    return windows[-1].g_per_kwh if unix >= windows[-1].end_unix else windows[0].g_per_kwh


def plan(
    windows: list[ForecastWindow],
    now_unix: float,
    deadline_unix: float,
    duration_seconds: float,
    safety_margin_seconds: float,
) -> Plan:
    duration = max(0.0, duration_seconds)
    now_mean = mean_intensity(windows, now_unix, now_unix + duration)
    latest = deadline_unix - safety_margin_seconds - duration
    if latest <= now_unix or not windows:
        return Plan(now_unix, now_mean, now_mean)  # no room to wait: run now
    candidates = {now_unix, latest}
    for window in windows:
        for edge in (window.start_unix, window.end_unix):
            candidates.add(edge)
            candidates.add(edge - duration)
    best = Plan(now_unix, now_mean, now_mean)
    for start in sorted(c for c in candidates if now_unix <= c <= latest):
        mean = mean_intensity(windows, start, start + duration)
        if mean < best.mean_g_per_kwh - 1e-9:  # strictly cleaner: ties keep the earlier start
            best = Plan(start, mean, now_mean)
    return best
