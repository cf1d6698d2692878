"""What the router knows about each upstream right now: in flight, health, recent TTFT,
and its share of a pool's recent requests. Updated from the data path's outcomes only
(passive health): no extra traffic to the model servers."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

FAILURE_OUTCOMES = frozenset({"upstream_unreachable", "upstream_timeout", "upstream_broken"})
"""Receipt outcomes that say the upstream (not the client) failed; 5xx statuses count too."""


def is_failure(outcome: str, status_code: int) -> bool:
    # "upstream_error" with no status: the connection failed before any response came.
    return outcome in FAILURE_OUTCOMES or status_code >= 500 or (outcome == "upstream_error" and status_code == 0)


@dataclass(slots=True)
class UpstreamState:
    name: str
    in_flight: int = 0
    queued_tokens: int = 0
    """Estimated prompt tokens sent and not yet answered (no first byte): its prefill backlog."""
    consecutive_failures: int = 0
    down_until: float = 0.0
    """Monotonic time until which the upstream is skipped; then one request probes it."""
    ttft: deque[tuple[float, float]] = field(default_factory=deque)
    """(when, seconds) of recent times to first byte."""

    def healthy(self, now: float) -> bool:
        return now >= self.down_until

    def record_outcome(self, failed: bool, now: float, *, after_failures: int, down_seconds: float) -> None:
        if not failed:
            self.consecutive_failures = 0
            self.down_until = 0.0
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= after_failures:
            self.down_until = now + down_seconds

    def record_ttft(self, seconds: float, now: float, window_seconds: float) -> None:
        self.ttft.append((now, seconds))
        self._trim(now, window_seconds)

    def ttft_p95(self, now: float, window_seconds: float) -> float | None:
        self._trim(now, window_seconds)
        if not self.ttft:
            return None
        values = sorted(s for _, s in self.ttft)
        return values[min(len(values) - 1, int(0.95 * len(values)))]

    def _trim(self, now: float, window_seconds: float) -> None:
        while self.ttft and self.ttft[0][0] < now - window_seconds:
            self.ttft.popleft()


class ShareWindow:
    """Which upstreams a pool's last `size` requests went to."""

    def __init__(self, size: int) -> None:
        self._recent: deque[str] = deque(maxlen=size)
        self._counts: Counter[str] = Counter()

    def add(self, name: str) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._counts[self._recent[0]] -= 1
        self._recent.append(name)
        self._counts[name] += 1

    def share(self, name: str) -> float:
        return self._counts[name] / len(self._recent) if self._recent else 0.0

    def __len__(self) -> int:
        return len(self._recent)
