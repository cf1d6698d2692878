"""Batch lines yield to interactive latency: pause and shrink while it is over objective.

What is measured: each interactive request's time to first byte on its upstream, as its
receipt records it (the proxy's `on_record` hook; the data path only reports timings).
For a streamed chat that is the time to first token, the wait a user watches before text
appears and the figure serving objectives are written in (vLLM's and TGI's TTFT); for a
non-streamed request it is the whole answer, which is what that user waits for. Batch
lines lengthen the engine's steps (their prefill chunks and decode slots share every
forward pass), so both rise when too many lines run beside interactive traffic.

The objective, judged once per window on the p95 of the interactive requests that ended
in it, per upstream:
- absolute: `interactive_latency_objective_seconds`;
- relative: `interactive_latency_objective_ratio` x the p95 measured in windows when no
  batch line was in flight (the baseline: what the same traffic gets alone). Without a
  baseline (or one older than BASELINE_MAX_AGE_SECONDS) the guard pauses lines for one
  window to measure it.

Control (as TCP's congestion window): the limit starts at one line and doubles each
healthy window (slow start: no jump from idle to `max_concurrency` lines at once) until
the first breach; then AIMD: a window over objective pauses new lines (those in flight
finish) and halves the limit, the first window back under resumes at that limit, and
each further healthy window adds one line, up to `max_concurrency`. The limit only grows
in windows when lines ran (RFC 7661's rule: a limit never tried is not known to be
safe), so hours without batches do not leave it wide open; nor does a window in which fewer
lines ran than the limit allowed. Only upstreams that batch lines ran on recently are judged (a slow
upstream no line touches is not the batches' doing), unless no line has finished yet.

The guard has no task of its own: it judges when asked (`allowed_lines`), on its clock,
so tests drive it with a fake clock and scripted latencies.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

MIN_SAMPLES = 8
"""Fewer interactive requests than this in a window on an upstream: no verdict on it
(one slow request is not a p95)."""
BASELINE_WINDOWS = 5
"""The baseline is the median of this many latest clean windows' p95 (robust to one odd window)."""
BASELINE_MAX_AGE_SECONDS = 600.0
"""A baseline older than this is measured again (the traffic's mix drifts)."""
PROBE_INTERVAL_SECONDS = 60.0
"""At most one measuring pause per this long (sparse traffic may never fill a window)."""
MAX_PROBE_WINDOWS = 3
"""A measuring pause ends after this many windows even if lines were still in flight."""
BATCH_UPSTREAM_MEMORY_SECONDS = 300.0
"""An upstream a batch line ran on counts as the batches' for this long."""
SEEN_RECEIPTS = 4096
"""Receipts are recorded twice or more (provisional, final): each request counts once."""


def p95(values: list[float]) -> float:
    data = sorted(values)
    pos = (len(data) - 1) * 0.95
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


class LatencyGuard:
    def __init__(
        self,
        max_lines: int,
        window_seconds: float,
        objective_seconds: float | None = None,
        objective_ratio: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        initial_limit: int = 1,
    ) -> None:
        self.max_lines = max_lines
        self.window_seconds = window_seconds
        self.objective_seconds = objective_seconds
        self.objective_ratio = objective_ratio
        self.clock = clock
        self.limit = max(1, min(initial_limit, max_lines))
        """Lines allowed in flight when not paused (slow start, then AIMD)."""
        self._slow_start = self.limit < max_lines
        self.paused = False
        self.breaches = 0
        """Windows judged over objective since start (a metric)."""
        self._window_start = clock()
        self._samples: dict[str, list[float]] = {}
        self._dirty = False
        """A batch line was in flight at some time in this window (not a baseline window)."""
        self._lines_in_flight = 0
        self._peak = 0
        """The most lines in flight at once in this window."""
        self._probing = False
        self._last_probe = float("-inf")
        self._probe_windows = 0
        self._baselines: dict[str, list[float]] = {}
        self._baseline_at: dict[str, float] = {}
        self._batch_upstreams: dict[str, float] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.last_p95_seconds: dict[str, float] = {}

    # -- what the proxy reports ---------------------------------------------------------

    def observe(self, receipt_id: str, upstream: str, latency_seconds: float | None, batch_line: bool) -> None:
        """One request ended on `upstream` (called for each receipt record; counted once)."""
        if receipt_id in self._seen:
            return
        self._seen[receipt_id] = None
        if len(self._seen) > SEEN_RECEIPTS:
            self._seen.popitem(last=False)
        self._judge()
        if batch_line:
            self._batch_upstreams[upstream] = self.clock()
        elif latency_seconds is not None and latency_seconds >= 0:
            self._samples.setdefault(upstream, []).append(latency_seconds)

    def lines_changed(self, in_flight: int) -> None:
        """The runner's batch lines in flight, after each start and end."""
        self._lines_in_flight = in_flight
        self._peak = max(self._peak, in_flight)
        if in_flight > 0:
            self._dirty = True

    def baseline_seconds(self, upstream: str) -> float | None:
        values = self._baselines.get(upstream)
        return p50(values) if values else None

    # -- what the runner asks -----------------------------------------------------------

    def allowed_lines(self) -> int:
        """Batch lines that may be in flight now (0: paused)."""
        self._judge()
        return 0 if self.paused else self.limit

    # -- the verdict, once per window -----------------------------------------------------

    def _judge(self) -> None:
        now = self.clock()
        if now - self._window_start < self.window_seconds:
            return
        samples, clean, peak = self._samples, not self._dirty, self._peak
        self._samples, self._dirty, self._window_start = {}, self._lines_in_flight > 0, now
        self._peak = self._lines_in_flight
        figures = {name: p95(values) for name, values in samples.items() if len(values) >= MIN_SAMPLES}
        self.last_p95_seconds = figures
        if clean:
            for name, figure in figures.items():
                history = self._baselines.setdefault(name, [])
                history.append(figure)
                del history[:-BASELINE_WINDOWS]
                self._baseline_at[name] = now
        # A window with no line in flight is never the batches' doing: it only measures.
        over = not clean and any(self._over(name, figure) for name, figure in figures.items() if self._judged(name, now))
        if over:
            self.breaches += 1
            self.limit = max(1, self.limit // 2)
            self.paused, self._probing, self._slow_start = True, False, False
        elif self._probing:
            self._probe_windows += 1  # lines in flight at the pause may take a window to end
            if clean or self._probe_windows >= MAX_PROBE_WINDOWS:
                self.paused = self._probing = False
        elif self.paused:
            self.paused = False  # resume at the halved limit
        elif peak >= self.limit:  # lines ran up to this limit and interactive latency held
            self.limit = min(self.max_lines, self.limit * 2 if self._slow_start else self.limit + 1)
        if not self.paused and self._needs_baseline(figures, now, clean):
            self._probing, self.paused, self._last_probe, self._probe_windows = True, True, now, 0

    def _over(self, upstream: str, p95_seconds: float) -> bool:
        if self.objective_seconds is not None and p95_seconds > self.objective_seconds:
            return True
        baseline = self.baseline_seconds(upstream)
        return self.objective_ratio is not None and baseline is not None and p95_seconds > self.objective_ratio * baseline

    def _judged(self, upstream: str, now: float) -> bool:
        recent = {name for name, at in self._batch_upstreams.items() if now - at < BATCH_UPSTREAM_MEMORY_SECONDS}
        return not recent or upstream in recent

    def _needs_baseline(self, figures: dict[str, float], now: float, clean: bool) -> bool:
        """Pause one window to measure traffic alone: a relative objective needs it."""
        if self.objective_ratio is None or clean or now - self._last_probe < PROBE_INTERVAL_SECONDS:
            return False
        return any(
            self._judged(name, now) and now - self._baseline_at.get(name, float("-inf")) > BASELINE_MAX_AGE_SECONDS for name in figures
        )


def p50(values: list[float]) -> float:
    data = sorted(values)
    middle = len(data) // 2
    return data[middle] if len(data) % 2 else (data[middle - 1] + data[middle]) / 2
