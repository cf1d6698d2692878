"""The device group's cost function, learned online, and its Aumann-Shapley prices.

Dynamic power is modelled as a saturating function of an additive load,

    F(x) = g_s(L(x)),   L(x) = a p + o d + c k + e1 sqrt(b) + e2 b,   g_s(L) = L / (1 + L / s)

with p prompt tokens/s, d output tokens/s, k context tokens read/s (each output token times the tokens in
its sequence's KV cache), b the mean number of sequences decoding (each makes one output
token per step), and s the saturation power (s = infinity: no saturation). This family
holds the shapes serving GPUs show, without being told which one is in play:
- additive prefill and decode power (s = infinity): a prompt token has a price, the
  decode batch draws a power sublinear in its size (weights are streamed once per step
  for the whole batch: e1 sqrt(b) + e2 b), or each output token has a price (o d: the
  two differ where prefill chunks slow the steps down);
- KV-cache reads: decode tokens of long contexts cost more (the c k term);
- one saturating curve of total work, or a power cap: g_s bends every unit's cost down
  together as the load grows (finite s).

Aumann-Shapley: along the path t x from no work to x, a unit of work pays the average
of its marginal cost, dF/dx_f (t x) = g_s'(L(t x)) dL/dx_f (t x). Integrated with
Gauss-Legendre points (exact enough at 8; the sqrt term after t = u^2). The prices times
the work add up to F(x) exactly (up to the quadrature), and with s = infinity the
split is exactly the separable one: each term shared by its own users.

Fitting: for each candidate s on a grid, non-negative least squares of g_s^-1(power) on
the four features, with exponential forgetting, on blocks of settled intervals
(each 5 s block, cut into 250 ms sub-blocks where the saturation is undone; a stale
counter read's energy mostly lands in the same block). The candidate whose one-step-ahead prediction
error is least is used. Why this and not a free basis (quadratics) fitted by RLS: it was
tried and extrapolated badly (negative marginal prices at loads it had seen little of,
prompts priced at zero); this family is monotone and concave by construction, its
parameters are few and non-negative, and its state (a few normal equations) persists.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

PROMPT_SCALE = 1000.0
"""Feature units, for well-conditioned normal equations: thousands of prompt and output
tokens/s and millions of context tokens read per second."""
OUTPUT_SCALE = 1000.0
CONTEXT_SCALE = 1e6
TERMS = ("prompt", "output", "context", "sqrt_batch", "batch", "quartic_root_batch")
ALL_TERMS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
WORK_TERMS = (1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
"""A saturating candidate prices work only (prompt and output tokens): under a curve of
total work, batch size and context add nothing the work does not already say, and
extra collinear terms would make the prompt's weight unidentifiable where power is flat."""
SATURATION_GRID = (math.inf, 3.0, 2.0, 1.5, 1.25, 1.1, -2.0, -1.5, -1.25, -1.1, -1.02)
"""Candidate s as multiples of the highest dynamic power seen (infinity: additive;
negative: the exponential knee)."""
BLOCK_SECONDS = 5.0
SUB_BLOCK_SECONDS = 0.25
"""Where the saturation is undone (g_s^-1 of each sub-block's mean power). g_s^-1 is
convex and steep near the ceiling, so a sub-block's noise (counter noise, and energy
stamped a poll early or late: at 50 ms a sub-block's power is off by tens of percent)
inflated the loads of busy sub-blocks, those with prompts, and the prompt's price came
out 25-30% high under a saturating curve (bench curve seeds 12, 15: 0.107 for 0.084,
0.16 for 0.12); at 250 ms, 0.084 and 0.128. Longer, the load's own swings within a
sub-block bias it the other way."""
WINDOW_BLOCKS = 1
"""Each refit reads the newest block only (5 s): with longer windows (20 s were tried)
consecutive rows overlap and the load swings of a busy server average out within them,
so the prompt's weight against the output's, and the separable fit's prompt price,
were poorly identified (additive: prompts priced 6-10% high; curve: 0.11 learned for a
true 0.064). A prompt placed in the wrong block is the price of shorter rows; it is
smaller."""
FORGETTING = 0.99
"""Per block: about the last 100 blocks (eight minutes of traffic) count."""
ERROR_FORGETTING = 0.85
"""Per block, for choosing among candidates: recent predictions count (about the last
seven blocks), not the first ones, made while a candidate with more terms had little
data."""
MIN_BLOCKS = 12
ERROR_SUB_BLOCKS = 2
"""Candidates are compared on their prediction error over half seconds (2 sub-blocks),
not 50 ms: within half a second, which step a streamed token fell in and where a prompt
was placed are not model error, and at 50 ms that noise let a separable fit (flat power:
a constant per sequence in the batch) pass for the better model of a saturated curve
(curve streams p90 over 5 seeds 12.7% -> 10.9%; additive seed 2 14.7% -> 2.0%)."""
MIN_PROMPT_RATIO = 0.005
SATURATION_EVIDENCE = 0.8
"""A saturating candidate is chosen over the separable one only with less than this
times its prediction error."""
"""Blocks with work before the fitted model is used (until then, the prior or the fallback)."""
GAUSS_LEGENDRE = (
    (0.0198550717512319, 0.0506142681451881), (0.1016667612931866, 0.1111905172266872),
    (0.2372337950418355, 0.1568533229389436), (0.4082826787521751, 0.1813418916891810),
    (0.5917173212478249, 0.1813418916891810), (0.7627662049581645, 0.1568533229389436),
    (0.8983332387068134, 0.1111905172266872), (0.9801449282487681, 0.0506142681451881),
)  # fmt: skip
"""8-point Gauss-Legendre nodes and weights on [0, 1]."""


@dataclass(frozen=True, slots=True)
class Rates:
    prompt_per_second: float
    output_per_second: float
    context_per_second: float
    batch: float

    def features(self) -> tuple[float, float, float, float, float, float]:
        b = max(0.0, self.batch)
        return (
            self.prompt_per_second / PROMPT_SCALE,
            self.output_per_second / OUTPUT_SCALE,
            self.context_per_second / CONTEXT_SCALE,
            math.sqrt(b),
            b,
            math.sqrt(math.sqrt(b)),
        )


@dataclass(frozen=True, slots=True)
class Prices:
    """Aumann-Shapley prices in joules: per prompt token, per output token, per context
    token read, and per second in the decode batch."""

    prompt: float
    output: float
    context: float
    batch_second: float

    def joules(self, prompt_tokens: float, output_tokens: float, context_tokens: float, batch_seconds: float) -> float:
        return (
            prompt_tokens * self.prompt
            + output_tokens * self.output
            + context_tokens * self.context
            + batch_seconds * self.batch_second
        )


@dataclass(frozen=True, slots=True)
class Fit:
    theta: tuple[float, float, float, float, float, float]
    saturation_watts: float

    def load(self, rates: Rates) -> float:
        return sum(t * f for t, f in zip(self.theta, rates.features()))

    def power_watts(self, rates: Rates) -> float:
        return saturate(self.load(rates), self.saturation_watts)

    def prices(self, rates: Rates) -> Prices:
        a, o, c, e1, e2, e4 = self.theta
        p, d, k, sqrt_b, b, root4_b = rates.features()
        s = self.saturation_watts
        straight = a * p + o * d + c * k + e2 * b
        linear = sqrt_part = 0.0
        for node, weight in GAUSS_LEGENDRE:
            # L(t x) at t = node (for the linear terms) and at t = node^2 (the sqrt term).
            linear += weight * slope(node * straight + e1 * sqrt_b * math.sqrt(node), s)
            sqrt_part += weight * slope(node * node * straight + e1 * sqrt_b * node, s)
        # d/db of e1 sqrt(t b), averaged over t: with t = u^2 it is e1 / sqrt(b) x the mean of g'.
        per_batch = e2 * linear + (e1 * sqrt_part / sqrt_b if sqrt_b > 0 else 0.0)
        # b ** (1/4) is a term of the additive candidate only (slope 1): its AS price is
        # its value over b (a homogeneous term's users share it by their part of b).
        per_batch += e4 * root4_b / b if b > 0 else 0.0
        return Prices(
            prompt=a * linear / PROMPT_SCALE,
            output=o * linear / OUTPUT_SCALE,
            context=c * linear / CONTEXT_SCALE,
            batch_second=per_batch,
        )


def _prompt_nearly_free(theta: tuple[float, ...]) -> bool:
    """Whether a separable fit prices a prompt token below MIN_PROMPT_RATIO of a lone
    sequence's output token. Prefill is compute bound: measured, a prompt token costs 1-30%
    of a decode token at batch 1; a fit far below that explains a power that stays flat
    while prompts come and go, which is a saturated device, not free prompts."""
    lone = Rates(0.0, 50.0, 0.0, 1.0)  # one sequence at a typical 50 tokens/s
    per_output = sum(t * f for t, f in zip(theta[1:], lone.features()[1:])) / 50.0
    per_prompt = theta[0] / PROMPT_SCALE
    return per_output > 0 and per_prompt < MIN_PROMPT_RATIO * per_output


def prediction_error(subs: list[list[float]], predicted_watts: list[float]) -> float:
    """Squared error x seconds of predicted against measured power, over groups of
    ERROR_SUB_BLOCKS sub-blocks (each sub-block: seconds, joules, features)."""
    error = 0.0
    for k in range(0, len(subs), ERROR_SUB_BLOCKS):
        part = subs[k : k + ERROR_SUB_BLOCKS]
        seconds = math.fsum(sub[0] for sub in part)
        measured = math.fsum(sub[1] for sub in part)
        expected = math.fsum(p * sub[0] for sub, p in zip(part, predicted_watts[k : k + ERROR_SUB_BLOCKS]))
        error += (measured - expected) ** 2 / seconds
    return error


def saturate(load: float, s: float) -> float:
    """g_s: s > 0 is L / (1 + L / s) (a soft knee); s < 0 is |s| (1 - exp(-L / |s|)) (a
    sharper one, as a power cap or a curve that flattens at the board limit)."""
    if math.isinf(s):
        return load
    if s > 0:
        return load / (1.0 + load / s)
    return -s * -math.expm1(load / s)


def slope(load: float, s: float) -> float:
    """g_s'(L)."""
    if math.isinf(s):
        return 1.0
    if s > 0:
        return 1.0 / (1.0 + load / s) ** 2
    return math.exp(load / s)


def unsaturate(power: float, s: float) -> float:
    """g_s^-1, bounded where power nears the ceiling (noise above the curve)."""
    if math.isinf(s):
        return power
    if s > 0:
        return power / (1.0 - min(power / s, 0.9))
    return s * math.log1p(-min(power / -s, 0.97))


class _Candidate:
    """Forgetting-weighted normal equations of one saturation candidate."""

    __slots__ = ("xx", "xy", "error", "theta")

    def __init__(self, n: int) -> None:
        self.xx = [[0.0] * n for _ in range(n)]
        self.xy = [0.0] * n
        self.error = 0.0
        self.theta: tuple[float, ...] | None = None


class CostModel:
    def __init__(self, forgetting: float = FORGETTING, block_seconds: float = BLOCK_SECONDS, min_blocks: int = MIN_BLOCKS) -> None:
        self._lambda = forgetting
        self._block_seconds = block_seconds
        self._min_blocks = min_blocks
        self._candidates = [_Candidate(len(TERMS)) for _ in SATURATION_GRID]
        self.peak_watts = 0.0
        """The highest dynamic power of a block seen (the saturation grid's unit)."""
        self.blocks = 0
        # Half-second sub-blocks: seconds, joules, then the sum of each feature x seconds.
        self._sub = [0.0] * (len(TERMS) + 2)
        self._window: deque[list[float]] = deque(maxlen=int(WINDOW_BLOCKS * block_seconds / SUB_BLOCK_SECONDS))
        self._block_seconds_so_far = 0.0
        self.fit: Fit | None = None

    @property
    def ready(self) -> bool:
        return self.fit is not None and self.blocks >= self._min_blocks

    def set_prior(self, fit: Fit, blocks: int) -> None:
        """Start from `fit` as if `blocks` blocks had shown it (a device prior)."""
        self.fit = fit
        self.blocks = max(self.blocks, blocks)

    # -- fitting ------------------------------------------------------------------------

    def observe(self, seconds: float, dynamic_joules: float, rates: Rates) -> None:
        """One settled interval: its length, dynamic joules and work rates."""
        if seconds <= 0:
            return
        sub = self._sub
        sub[0] += seconds
        sub[1] += dynamic_joules
        for j, value in enumerate(rates.features()):
            sub[2 + j] += value * seconds
        if sub[0] < SUB_BLOCK_SECONDS:
            return
        self._sub = [0.0] * len(sub)
        self._window.append(sub)
        self._block_seconds_so_far += sub[0]
        if self._block_seconds_so_far < self._block_seconds:
            return
        self._block_seconds_so_far = 0.0
        if not any(any(s[2:]) for s in list(self._window)[-int(self._block_seconds / SUB_BLOCK_SECONDS) :]):
            return  # an idle block: nothing about work in it
        newest = list(self._window)[-int(round(self._block_seconds / SUB_BLOCK_SECONDS)) :]
        block_watts = math.fsum(s[1] for s in newest) / math.fsum(s[0] for s in newest)
        self.peak_watts = max(self.peak_watts, block_watts)  # a block's mean: counter noise averaged out
        self._update()
        self.blocks += 1

    def _update(self) -> None:
        """Fit every candidate on the window. The saturation is undone per sub-block,
        not on the window's mean power: the load varies within a window, and the inverse
        of a concave curve at the mean is not the mean of the inverse."""
        lam = self._lambda
        n = len(TERMS)
        window = list(self._window)
        seconds = math.fsum(s[0] for s in window)
        x = [math.fsum(s[2 + j] for s in window) / seconds for j in range(n)]
        newest = window[-int(round(self._block_seconds / SUB_BLOCK_SECONDS)) :]
        best: tuple[float, Fit] | None = None
        for candidate, multiple in zip(self._candidates, SATURATION_GRID):
            if not math.isinf(multiple) and self.peak_watts <= 0:
                continue  # no power seen yet: nothing saturates
            s = math.inf if math.isinf(multiple) else multiple * self.peak_watts
            mask = ALL_TERMS if math.isinf(multiple) else WORK_TERMS
            if candidate.theta is not None and self.blocks >= len(TERMS):
                # Not before a candidate has had a block per term: the first fits are
                # underdetermined, and the separable candidate's (most terms) predicted
                # so badly that, forgotten at 0.85 per block, it lost to a saturating
                # one for 27 blocks on a device with no saturation (additive seed 6).
                # One-step-ahead error on the newest block's half seconds: where prefill
                # bursts meet a busy batch, saturation and a concave decode power part.
                predicted = [saturate(sum(t * f / sub[0] for t, f in zip(candidate.theta, sub[2:])), s) for sub in newest]
                candidate.error = ERROR_FORGETTING * candidate.error + prediction_error(newest, predicted)
            loads = [unsaturate(max(0.0, sub[1] / sub[0]), s) for sub in window]
            y = math.fsum(load * sub[0] for load, sub in zip(loads, window)) / seconds
            # Weighted least squares in the unsaturated space: a watt of noise is 1 / g'
            # watts of load there, so a window near the ceiling, where power hardly moves
            # with work (and the prompt's weight is not identifiable), counts by g'^2.
            weight = math.fsum(slope(load, s) ** 2 * sub[0] for load, sub in zip(loads, window)) / seconds
            xm = [v * m for v, m in zip(x, mask)]
            for i in range(n):
                row = candidate.xx[i]
                for j in range(n):
                    row[j] = lam * row[j] + weight * xm[i] * xm[j]
                candidate.xy[i] = lam * candidate.xy[i] + weight * xm[i] * y
            theta, _ = nnls(candidate.xx, candidate.xy)
            candidate.theta = theta
            if theta[0] > 0:
                # The separable candidate is preferred unless a saturating one predicts
                # clearly better: a concave decode power alone can pass for saturation.
                error = candidate.error if math.isinf(multiple) else candidate.error / SATURATION_EVIDENCE
                if math.isinf(multiple) and _prompt_nearly_free(theta):
                    error = math.inf  # flat power passed off as free prompts: saturation
                if best is None or error < best[0]:
                    best = (error, Fit(tuple(theta), s))  # type: ignore[arg-type]
        if best is not None:
            self.fit = best[1]

    # -- using it -----------------------------------------------------------------------

    def prices(self, rates: Rates) -> Prices:
        assert self.fit is not None
        return self.fit.prices(rates)

    def prompt_rate_for(self, dynamic_watts: float, rates: Rates, most: float = 50_000.0) -> float:
        """Prompt tokens/s that, with the decode work in `rates`, explain this power."""
        fit = self.fit
        if fit is None or fit.theta[0] <= 0:
            return 0.0
        # Invert g_s, then the load is linear in the prompt rate.
        load = unsaturate(max(0.0, dynamic_watts), fit.saturation_watts)
        rest = fit.load(Rates(0.0, rates.output_per_second, rates.context_per_second, rates.batch))
        return min(most, max(0.0, (load - rest) / fit.theta[0] * PROMPT_SCALE))

    # -- persistence --------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "terms": list(TERMS),
            "grid": [None if math.isinf(m) else m for m in SATURATION_GRID],
            "sub_block_seconds": SUB_BLOCK_SECONDS,
            "peak_watts": self.peak_watts,
            "blocks": self.blocks,
            "candidates": [{"xx": c.xx, "xy": c.xy, "error": c.error, "theta": c.theta} for c in self._candidates],
            "fit": None if self.fit is None else {"theta": list(self.fit.theta), "saturation_watts": None if math.isinf(self.fit.saturation_watts) else self.fit.saturation_watts},
            # The sliding window each refit reads, and where the current block stands: without
            # them a restarted model's next fits see seconds of data instead of the window.
            "window": [list(sub) for sub in self._window],
            "sub_block": list(self._sub),
            "block_seconds_so_far": self._block_seconds_so_far,
        }

    def load(self, state: dict[str, Any]) -> bool:
        """Restore a saved fit; a state of another basis, grid or sub-block length is
        ignored (returns False)."""
        try:
            if state.get("terms") != list(TERMS) or state.get("grid") != [None if math.isinf(m) else m for m in SATURATION_GRID]:
                return False
            if state.get("sub_block_seconds") != SUB_BLOCK_SECONDS:
                return False  # its window's sub-blocks are of another length
            candidates = []
            for saved in state["candidates"]:
                candidate = _Candidate(len(TERMS))
                candidate.xx = [[float(v) for v in row] for row in saved["xx"]]
                candidate.xy = [float(v) for v in saved["xy"]]
                candidate.error = float(saved["error"])
                candidate.theta = None if saved["theta"] is None else tuple(float(v) for v in saved["theta"])
                candidates.append(candidate)
            fit = state.get("fit")
            loaded_fit = None
            if fit is not None:
                s = fit["saturation_watts"]
                loaded_fit = Fit(tuple(float(v) for v in fit["theta"]), math.inf if s is None else float(s))  # type: ignore[arg-type]
            if len(candidates) != len(SATURATION_GRID):
                return False
            width = len(TERMS) + 2
            window = [[float(v) for v in sub] for sub in state.get("window", [])]
            sub_block = [float(v) for v in state.get("sub_block", [0.0] * width)]
            block_seconds = float(state.get("block_seconds_so_far", 0.0))
            if any(len(sub) != width for sub in window) or len(sub_block) != width:
                return False
        except (KeyError, TypeError, ValueError):
            return False
        self._window.clear()
        self._window.extend(window)
        self._sub = sub_block
        self._block_seconds_so_far = block_seconds
        self._candidates = candidates
        self.fit = loaded_fit
        self.peak_watts = float(state.get("peak_watts", 0.0))
        self.blocks = int(state.get("blocks", 0))
        return True


def nnls(xx: list[list[float]], xy: list[float]) -> tuple[tuple[float, ...], float]:
    """Non-negative least squares from normal equations, by trying every set of free
    variables (63 for 6 unknowns) and keeping the feasible one with the least error.
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
