"""Idle power of a device group, learned online (the cost of work is costmodel.py's)."""

from __future__ import annotations

from collections import deque

IDLE_CHUNK_SECONDS = 1.0
"""Consecutive idle intervals are summed into chunks this long before they count: a
stale counter read shows one interval at 0 W and the next at twice the power, and
counter noise is a few percent per refresh; over a second both cancel."""
IDLE_MIN_CHUNKS = 3


class IdlePowerLearner:
    """Idle power of a device group: configured, or the median power of chunks of time
    with nothing in flight (a median: a chunk right after a burst still holds the tail
    of its work). Until enough such chunks exist, a prior (the device's idle from NVML
    or a table) or else the lowest power of any interval in the last minute stands in
    (an upper bound on idle)."""

    def __init__(self, fixed_watts: float | None = None, window: int = 300, prior_watts: float | None = None) -> None:
        self._fixed = fixed_watts
        self.prior_watts = prior_watts
        self._chunks = deque[float](maxlen=window)
        self._busy = deque[float](maxlen=600)  # about a minute at 10 Hz
        self._chunk_joules = 0.0
        self._chunk_seconds = 0.0
        self._cached: float | None = None

    @property
    def learned(self) -> bool:
        return self._fixed is None

    @property
    def known(self) -> bool:
        """Whether the value in use is configured, learned or a prior, not the stand-in
        (the lowest recent power: a stale counter read makes it 0 W)."""
        return self._fixed is not None or self.prior_watts is not None or self._learned_watts() is not None

    def observe(self, joules: float, seconds: float) -> None:
        """Energy and length of an interval with nothing in flight."""
        if self._fixed is not None or seconds <= 0:
            return
        self._chunk_joules += joules
        self._chunk_seconds += seconds
        if self._chunk_seconds >= IDLE_CHUNK_SECONDS:
            self._chunks.append(self._chunk_joules / self._chunk_seconds)
            self._chunk_joules = self._chunk_seconds = 0.0
            self._cached = None

    def interrupt(self) -> None:
        """Work arrived: an unfinished chunk is dropped, not joined to the next idle stretch
        (its last interval may hold a stale read whose energy lands in a busy one)."""
        self._chunk_joules = self._chunk_seconds = 0.0

    def _learned_watts(self) -> float | None:
        if len(self._chunks) < IDLE_MIN_CHUNKS:
            return None
        if self._cached is None:
            ordered = sorted(self._chunks)
            self._cached = ordered[len(ordered) // 2]
        return self._cached

    def current_watts(self) -> float | None:
        """The value in use, without observing anything (for metrics)."""
        if self._fixed is not None:
            return self._fixed
        learned = self._learned_watts()
        if learned is not None:
            return learned
        if self.prior_watts is not None:
            return self.prior_watts
        return min(self._busy) if self._busy else None

    def watts(self, fallback_watts: float) -> float:
        if self._fixed is not None:
            return self._fixed
        learned = self._learned_watts()
        if learned is not None:
            return learned
        if self.prior_watts is not None:
            return self.prior_watts
        self._busy.append(fallback_watts)
        return min(self._busy)

    # -- persistence --------------------------------------------------------------------

    def state(self) -> list[float]:
        return list(self._chunks)

    def load(self, chunks: list[float]) -> None:
        self._chunks.extend(float(w) for w in chunks if w >= 0)
        self._cached = None
