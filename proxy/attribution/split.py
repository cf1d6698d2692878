"""Pure functions that split one interval's energy (DESIGN.md section 5).

measured = static (idle power x time) + dynamic.
- static: shared equally among the requests present at each instant; instants with
  nobody present are idle.
- dynamic: shared by work (prefill_weight x prompt tokens + output tokens, or work
  units); with no work seen, by presence; with nobody present, idle.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Sequence

from proxy.attribution.usage import RequestUsage


def presence_shares(spans: Sequence[tuple[float, float]], t0: float, t1: float) -> tuple[list[float], float]:
    """Each span's share of [t0, t1] when every instant is split equally among the spans
    covering it; plus the time nobody covers. Shares and idle time sum to t1 - t0."""
    duration = t1 - t0
    if not spans:
        return [], duration
    if all(a <= t0 and b >= t1 for a, b in spans):  # the common case: everyone present throughout
        each = duration / len(spans)
        return [each] * len(spans), 0.0
    clipped = [(max(a, t0), min(b, t1)) for a, b in spans]
    points = sorted({t0, t1, *(a for a, _ in clipped), *(b for _, b in clipped)})
    delta = [0] * len(points)
    for a, b in clipped:
        if b > a:
            delta[bisect_left(points, a)] += 1
            delta[bisect_left(points, b)] -= 1
    # cumulative per-capita time C(points[i]) = integral of 1/n over covered time
    per_capita = [0.0] * len(points)
    idle = 0.0
    active = 0
    for i in range(len(points) - 1):
        active += delta[i]
        step = points[i + 1] - points[i]
        if active > 0:
            per_capita[i + 1] = per_capita[i] + step / active
        else:
            per_capita[i + 1] = per_capita[i]
            idle += step
    shares = []
    for a, b in clipped:
        if b > a:
            shares.append(per_capita[bisect_left(points, b)] - per_capita[bisect_left(points, a)])
        else:
            shares.append(0.0)
    return shares, idle


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _spread(total: float, s0: float, s1: float, t0: float, t1: float) -> float:
    """The part of `total` work, done evenly over [s0, s1], that falls in [t0, t1]."""
    if total <= 0:
        return 0.0
    if s1 <= s0:  # instantaneous: it belongs to the interval that holds its time
        return total if t0 < s1 <= t1 else 0.0
    return total * _overlap(s0, s1, t0, t1) / (s1 - s0)


def known_work(
    usage: RequestUsage, t0: float, t1: float, binned_output: float, default_prefill_tokens_per_second: float
) -> tuple[float, float]:
    """(prompt tokens, output tokens + work units) of a request in [t0, t1], from what is
    known now (exact once it is closed). The caller weighs the prompt part."""
    end = usage.closed_at if usage.closed_at is not None else t1
    prompt = usage.prompt_tokens if usage.prompt_tokens is not None else usage.prompt_tokens_estimate
    units = 0.0
    if usage.work_units is not None:
        units = _spread(usage.work_units, usage.opened_at, end, t0, t1)
    if usage.streaming:
        prefill_end = usage.first_token_at if usage.first_token_at is not None else end
        output = binned_output
        sampled = usage.sampled_output_tokens
        if usage.output_tokens is not None and sampled > 0:
            output *= usage.output_tokens / sampled  # chunks are not always one token each
        return _spread(prompt, usage.opened_at, prefill_end, t0, t1), units + output
    if usage.closed_at is None:
        return 0.0, units
    # Non-streaming: only totals are known. Prefill first, then decode.
    duration = end - usage.opened_at
    if usage.prefill_seconds is not None:
        prefill_seconds = min(duration, usage.prefill_seconds)
    else:
        prefill_seconds = min(duration * 0.5, prompt / default_prefill_tokens_per_second)
    split_at = usage.opened_at + prefill_seconds
    output_total = usage.output_tokens or 0
    return _spread(prompt, usage.opened_at, split_at, t0, t1), units + _spread(output_total, split_at, end, t0, t1)


def split_dynamic(dynamic_joules: float, works: Sequence[float], presence: Sequence[float]) -> tuple[list[float], float]:
    """Dynamic joules per member, and the part that goes to idle (nobody present)."""
    total_work = sum(works)
    if total_work > 0:
        return [dynamic_joules * w / total_work for w in works], 0.0
    total_presence = sum(presence)
    if total_presence > 0:
        return [dynamic_joules * p / total_presence for p in presence], 0.0
    return [0.0] * len(works), dynamic_joules
