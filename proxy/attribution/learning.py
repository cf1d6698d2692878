"""What attribution learns online: idle power, and the cost of prompt vs output tokens."""

from __future__ import annotations

from collections import deque

IDLE_PERCENTILE = 0.05
IDLE_MIN_SAMPLES = 10


class IdlePowerLearner:
    """Idle power of a device group: configured, or a low percentile of the power seen
    while nothing was in flight. Until enough such samples exist, the lowest power of any
    interval in the last minute stands in (an upper bound on idle)."""

    def __init__(self, fixed_watts: float | None = None, window: int = 3000) -> None:
        self._fixed = fixed_watts
        self._idle = deque[float](maxlen=window)
        self._busy = deque[float](maxlen=600)  # about a minute at 10 Hz
        self._cached: float | None = None

    @property
    def learned(self) -> bool:
        return self._fixed is None

    def observe(self, watts: float) -> None:
        """Power of an interval with nothing in flight."""
        if self._fixed is not None:
            return
        self._idle.append(watts)
        self._cached = None

    def current_watts(self) -> float | None:
        """The value in use, without observing anything (for metrics)."""
        if self._fixed is not None:
            return self._fixed
        if len(self._idle) >= IDLE_MIN_SAMPLES:
            return self.watts(0.0)
        return min(self._busy) if self._busy else None

    def watts(self, fallback_watts: float) -> float:
        if self._fixed is not None:
            return self._fixed
        if len(self._idle) >= IDLE_MIN_SAMPLES:
            if self._cached is None:
                ordered = sorted(self._idle)
                self._cached = ordered[int(IDLE_PERCENTILE * (len(ordered) - 1))]
            return self._cached
        self._busy.append(fallback_watts)
        return min(self._busy)


class WorkCostLearner:
    """Joules per prompt token and per output token, by recursive least squares on
    settled intervals (dynamic energy ~ a x prompt + b x output), with forgetting and
    clamped to non-negative. The prefill weight is a / b.

    Falls back to the configured (or default) weight until the fit has seen enough
    intervals with both kinds of work to be identifiable."""

    def __init__(
        self,
        fixed_prefill_weight: float | None,
        default_prefill_weight: float,
        forgetting: float = 0.999,
        min_observations: int = 50,
    ) -> None:
        self._fixed = fixed_prefill_weight
        self._default = default_prefill_weight
        self._lambda = forgetting
        self._min = min_observations
        # RLS state for theta = (a, b); P starts large (weak prior).
        self._theta = [0.0, 0.0]
        self._p = [[1e3, 0.0], [0.0, 1e3]]
        self._mixed_observations = 0

    @property
    def prefill_weight(self) -> float:
        if self._fixed is not None:
            return self._fixed
        a, b = self._theta
        if self._mixed_observations < self._min or b <= 0:
            return self._default
        return max(0.0, min(a / b, 10.0))

    @property
    def joules_per_output_token(self) -> float | None:
        return self._theta[1] if self._mixed_observations >= self._min and self._theta[1] > 0 else None

    @property
    def joules_per_prompt_token(self) -> float | None:
        return self._theta[0] if self._mixed_observations >= self._min else None

    def observe(self, dynamic_joules: float, prompt_tokens: float, output_tokens: float) -> None:
        if prompt_tokens <= 0 and output_tokens <= 0:
            return
        if prompt_tokens > 0 and output_tokens > 0:
            self._mixed_observations += 1
        x = (prompt_tokens, output_tokens)
        p = self._p
        px = (p[0][0] * x[0] + p[0][1] * x[1], p[1][0] * x[0] + p[1][1] * x[1])
        denom = self._lambda + x[0] * px[0] + x[1] * px[1]
        gain = (px[0] / denom, px[1] / denom)
        error = dynamic_joules - (self._theta[0] * x[0] + self._theta[1] * x[1])
        self._theta = [max(0.0, self._theta[0] + gain[0] * error), max(0.0, self._theta[1] + gain[1] * error)]
        lam = self._lambda
        self._p = [
            [(p[0][0] - gain[0] * px[0]) / lam, (p[0][1] - gain[0] * px[1]) / lam],
            [(p[1][0] - gain[1] * px[0]) / lam, (p[1][1] - gain[1] * px[1]) / lam],
        ]
