"""The last hour of settled requests, in one-minute buckets: grams per hour and per 1k
tokens without keeping every receipt (61 small buckets, whatever the request rate)."""

from __future__ import annotations

import time
from dataclasses import dataclass

BUCKET_SECONDS = 60
WINDOW_SECONDS = 3600


@dataclass(slots=True)
class Bucket:
    minute: int
    """Unix time // 60 of the requests it holds (by when they finished)."""
    requests: int = 0
    energy_joules: float = 0.0
    co2e_grams: float = 0.0
    tokens: int = 0
    """Prompt plus output tokens."""


class HourWindow:
    """Final figures of requests that finished in the last hour."""

    def __init__(self, started_unix: float | None = None) -> None:
        self._buckets: dict[int, Bucket] = {}
        self._started_unix = started_unix if started_unix is not None else time.time()

    def add(self, finished_unix: float, energy_joules: float, co2e_grams: float, tokens: int) -> None:
        minute = int(finished_unix // BUCKET_SECONDS)
        bucket = self._buckets.get(minute)
        if bucket is None:
            bucket = self._buckets[minute] = Bucket(minute)
            self._expire(finished_unix)
        bucket.requests += 1
        bucket.energy_joules += max(0.0, energy_joules)
        bucket.co2e_grams += max(0.0, co2e_grams)
        bucket.tokens += max(0, tokens)

    def _expire(self, now_unix: float) -> None:
        oldest = int((now_unix - WINDOW_SECONDS) // BUCKET_SECONDS)
        for minute in [m for m in self._buckets if m < oldest]:
            del self._buckets[minute]

    def summary(self, now_unix: float | None = None) -> dict[str, object]:
        """Totals over the last hour (or since start, when younger), rates per hour and per
        1k tokens, and the per-minute grams for the chart (oldest first, 60 values)."""
        now = now_unix if now_unix is not None else time.time()
        self._expire(now)
        current = int(now // BUCKET_SECONDS)
        first = current - WINDOW_SECONDS // BUCKET_SECONDS + 1
        buckets = [b for b in self._buckets.values() if first <= b.minute <= current]
        grams = sum(b.co2e_grams for b in buckets)
        joules = sum(b.energy_joules for b in buckets)
        tokens = sum(b.tokens for b in buckets)
        requests = sum(b.requests for b in buckets)
        # A proxy up for ten minutes has ten minutes of data: the hourly rate is scaled
        # from what it saw, not diluted by the minutes before it started.
        span_seconds = min(float(WINDOW_SECONDS), max(1.0, now - self._started_unix))
        per_minute = {b.minute: b.co2e_grams for b in buckets}
        return {
            "window_seconds": span_seconds,
            "requests": requests,
            "energy_joules": joules,
            "co2e_grams": grams,
            "tokens": tokens,
            "grams_per_hour": grams * 3600.0 / span_seconds,
            "grams_per_1k_tokens": grams * 1000.0 / tokens if tokens else None,
            "grams_per_minute": [per_minute.get(m, 0.0) for m in range(first, current + 1)],
        }
