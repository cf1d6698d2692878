"""What attribution learns online: idle power, and the cost of prompt tokens and of decoding."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

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


BATCH_EXPONENTS = tuple(k / 10 for k in range(1, 11))
"""Candidate exponents of decode power in batch size: 1 is linear, lower is flatter."""
BLOCK_SECONDS = 5.0
"""Settled intervals are summed into blocks this long before they are fitted (see observe)."""


@dataclass(frozen=True, slots=True)
class WorkCosts:
    """A fitted cost model of a device group: an interval's dynamic joules =
    prompt_joules_per_token x prompt tokens + decode power x seconds decoding, where
    decode power = fixed_watts + batch_watts x batch ** batch_exponent, batch being the
    number of sequences decoding. Output tokens come one per sequence per decode step, so
    their cost is the decode energy over them (cheaper in a bigger batch)."""

    prompt_joules_per_token: float
    fixed_watts: float
    batch_watts: float
    batch_exponent: float

    def decode_joules(self, decode_seconds: float, sequence_seconds: float) -> float:
        """Energy of decoding for `decode_seconds` with `sequence_seconds` of sequences in
        the batch in all (their mean batch size is the ratio)."""
        if decode_seconds <= 0:
            return 0.0
        batch = sequence_seconds / decode_seconds
        return decode_seconds * (self.fixed_watts + self.batch_watts * batch**self.batch_exponent)


class _NormalEquations:
    """Forgetting-weighted X'X and X'y of one linear model."""

    __slots__ = ("xx", "xy")

    def __init__(self, size: int) -> None:
        self.xx = [[0.0] * size for _ in range(size)]
        self.xy = [0.0] * size

    def add(self, x: Sequence[float], y: float, lam: float) -> None:
        for i, xi in enumerate(x):
            row = self.xx[i]
            for j, xj in enumerate(x):
                row[j] = lam * row[j] + xi * xj
            self.xy[i] = lam * self.xy[i] + xi * y


class WorkCostLearner:
    """What work costs on a device group (WorkCosts), fitted on settled intervals by
    non-negative least squares with exponential forgetting:
    - prefill is compute bound: a prompt token costs about the same whatever else runs;
    - decode is memory bound: a step streams the weights once for the whole batch, so
      decode power grows less than linearly with the batch: a fixed part plus a power of
      the batch, whose exponent is picked from BATCH_EXPONENTS by least error.

    O(len(BATCH_EXPONENTS)) per interval, the fits (exact small NNLS) once per block.
    Until enough blocks with both prefill and decode were seen (or when a prefill weight
    is configured), `costs()` is None and the caller splits by prefill weight x prompt
    tokens + output tokens."""

    def __init__(
        self,
        fixed_prefill_weight: float | None,
        default_prefill_weight: float,
        forgetting: float = 0.95,
        min_observations: int = 4,
        block_seconds: float = BLOCK_SECONDS,
    ) -> None:
        """forgetting is per block (0.99: about the last 100 blocks count);
        min_observations counts blocks with both prefill and decode in them."""
        self._fixed = fixed_prefill_weight
        self._lambda = forgetting
        self._min = min_observations
        self._block_seconds = block_seconds
        self._models = [_NormalEquations(3) for _ in BATCH_EXPONENTS]
        # The block being summed: seconds, dynamic joules, prompt tokens, output tokens,
        # decode seconds, then decode seconds x batch ** exponent for each exponent.
        self._block = [0.0] * (5 + len(BATCH_EXPONENTS))
        self._costs: WorkCosts | None = None
        self._mixed_observations = 0
        self._decode_joules = 0.0  # forgetting-weighted, for joules per output token
        self._output_tokens = 0.0
        self.fallback_weight = fixed_prefill_weight if fixed_prefill_weight is not None else default_prefill_weight
        self.last_weight = self.fallback_weight
        """Joules per prompt token over joules per output token in the latest interval."""

    @property
    def prefill_weight(self) -> float:
        return self.last_weight

    def costs(self) -> WorkCosts | None:
        """The fitted model once learned; None while the prefill weight rules."""
        return self._costs

    @property
    def joules_per_output_token(self) -> float | None:
        """Recent decode energy over recent output tokens, once learned."""
        if self._costs is None or self._output_tokens <= 0:
            return None
        return self._decode_joules / self._output_tokens

    def observe(
        self,
        seconds: float,
        dynamic_joules: float,
        prompt_tokens: float,
        output_tokens: float,
        decode_seconds: float,
        sequence_seconds: float,
    ) -> None:
        """One settled interval: its length, dynamic joules and work totals.

        Intervals are summed into blocks before they are fitted: where the proxy places a
        prompt's tokens in time is only approximately where the server processed them, and
        such errors move work between neighbouring intervals. In a block they cancel,
        instead of biasing the fitted price of a prompt token towards zero (errors in
        variables)."""
        if self._fixed is not None:
            return
        block = self._block
        block[0] += seconds
        block[1] += dynamic_joules
        block[2] += prompt_tokens
        block[3] += output_tokens
        block[4] += decode_seconds
        if decode_seconds > 0:
            batch = sequence_seconds / decode_seconds
            for k, exponent in enumerate(BATCH_EXPONENTS):
                block[5 + k] += decode_seconds * batch**exponent
        if block[0] < self._block_seconds:
            return
        self._block = [0.0] * len(block)
        _, joules, prompt, output, decoding = block[:5]
        if prompt <= 0 and output <= 0:
            return
        if prompt > 0 and output > 0:
            self._mixed_observations += 1
        for k, model in enumerate(self._models):
            model.add((prompt, decoding, block[5 + k]), joules, self._lambda)
        if self._mixed_observations >= self._min:
            self._refit()
        if self._costs is not None:
            self._decode_joules = self._lambda * self._decode_joules + max(0.0, joules - self._costs.prompt_joules_per_token * prompt)
            self._output_tokens = self._lambda * self._output_tokens + output

    def _refit(self) -> None:
        best: tuple[float, WorkCosts] | None = None
        for exponent, model in zip(BATCH_EXPONENTS, self._models):
            theta, change = nnls(model.xx, model.xy)
            if theta[0] <= 0:
                continue  # prompt tokens must cost something for the model to place them
            if best is None or change < best[0]:
                best = (change, WorkCosts(theta[0], theta[1], theta[2], exponent))
        self._costs = best[1] if best is not None else None


def nnls(xx: list[list[float]], xy: list[float]) -> tuple[tuple[float, ...], float]:
    """Non-negative least squares from normal equations, by trying every set of free
    variables (7 for 3 unknowns) and keeping the feasible one with the least error.
    Returns the solution and its sum of squared errors less y'y."""
    n = len(xy)
    best_change, best = 0.0, (0.0,) * n
    for mask in range(1, 1 << n):
        free = [i for i in range(n) if mask >> i & 1]
        solved = _solve([[xx[i][j] for j in free] for i in free], [xy[i] for i in free])
        if solved is None or min(solved) < 0:
            continue
        theta = [0.0] * n
        for i, v in zip(free, solved):
            theta[i] = v
        # Sum of squared errors minus y'y: theta' X'X theta - 2 theta' X'y.
        change = sum(theta[i] * xx[i][j] * theta[j] for i in free for j in free) - 2 * sum(theta[i] * xy[i] for i in free)
        if change < best_change:
            best_change, best = change, tuple(theta)
    return best, best_change


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when (nearly) singular."""
    n = len(b)
    m = [row[:] + [v] for row, v in zip(a, b)]
    scale = max(abs(m[i][i]) for i in range(n))
    if scale <= 0:
        return None
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) <= 1e-12 * scale:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for k in range(col, n + 1):
                m[r][k] -= f * m[col][k]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (m[r][n] - sum(m[r][k] * out[k] for k in range(r + 1, n))) / m[r][r]
    return out
