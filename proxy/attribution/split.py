"""Pure functions that split one interval's energy (DESIGN.md section 5).

measured = static (idle power x time) + dynamic.
- static: shared equally among the requests present at each instant; instants with
  nobody present are idle.
- dynamic: shared by work (prefill_weight x prompt tokens + output tokens, or work
  units); with no work seen, by presence; with nobody present, idle. Once the group's
  costs are learned, prompts are paid their price in joules and the decoding batch
  shares the rest by time in the batch (split_priced).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from typing import Callable, Sequence

from proxy.attribution.prefill import queued_prompt_in
from proxy.attribution.timing import Pace
from proxy.attribution.usage import RequestUsage

StepCount = Callable[[float], "float | None"]
PrefillFrom = Callable[[float, "float | None", float, float], "float | None"]
"""(a request's arrival, the end of the prefill queued before it, the end of its own, its
prompt tokens) -> where its prefill began by the steps streams showed
(steps.StepEnds.prefill_start), None where they are not known."""


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


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    # Conditionals, not min/max: this runs for every request in every interval.
    low = a0 if a0 > b0 else b0
    high = a1 if a1 < b1 else b1
    return high - low if high > low else 0.0


def _spread(total: float, s0: float, s1: float, t0: float, t1: float) -> float:
    """The part of `total` work, done evenly over [s0, s1], that falls in [t0, t1]."""
    if total <= 0:
        return 0.0
    if s1 <= s0:  # instantaneous: it belongs to the interval that holds its time
        return total if t0 < s1 <= t1 else 0.0
    return total * overlap(s0, s1, t0, t1) / (s1 - s0)


def stepped_output(usage: RequestUsage, first: float, last: float, t0: float, t1: float, steps_by: StepCount | None) -> float | None:
    """A closed request's output work in [t0, t1] from the steps it decoded in: each
    token is the work of the step that ended with it, spread over that step, so an
    interval inside a long step (a chunk's) holds part of a token, not none, and the
    next one not a whole one. None where the steps are not known."""
    if steps_by is None or not usage.output_tokens:
        return None
    at_first, at_last = steps_by(first), steps_by(last)
    if at_first is None or at_last is None or at_last <= at_first:
        return None
    lo, hi = max(t0, first), min(t1, last)
    if hi <= lo:
        return 0.0
    at_lo, at_hi = steps_by(lo), steps_by(hi)
    if at_lo is None or at_hi is None:
        return None
    return usage.output_tokens * (at_hi - at_lo) / (at_last - at_first)


def _queued_behind(usage: RequestUsage) -> float | None:
    """Where the prefill of the request queued before it ended (first come, first
    served: its own began no earlier than that step); None where not known."""
    before = usage.queued_after
    ended = before.prefill_ended_at() if before is not None else None
    own = usage.prefill_ended_at()
    if ended is None or ended <= usage.opened_at or (own is not None and ended >= own):
        return None  # nothing to wait for, or an estimate that cannot be right
    return ended


def known_work(
    usage: RequestUsage,
    t0: float,
    t1: float,
    binned_output: float,
    pace: Pace,
    progress: tuple[float, float],
    steps_by: StepCount | None = None,
    prefill_from: PrefillFrom | None = None,
) -> tuple[float, float, float]:
    """(prompt tokens, output tokens + work units, seconds in the decode batch) of a
    request in [t0, t1], from what is known now (exact once it is closed). `progress` is
    the group's prefill progress at t0 and t1 (prefill.py); `steps_by`: the steps the
    server had done by a time (steps.StepEnds.steps_by); `prefill_from`: where a
    prefill that ended at a step end began (PrefillFrom)."""
    end = usage.closed_at if usage.closed_at is not None else t1
    prompt = usage.prompt_tokens if usage.prompt_tokens is not None else usage.prompt_tokens_estimate
    units = 0.0
    if usage.work_units is not None:
        units = _spread(usage.work_units, usage.opened_at, end, t0, t1)
    if usage.streaming and usage.first_token_at is None and usage.closed_at is None and usage.queue_to_tokens > usage.queue_from_tokens:
        # Still waiting for its first token: its prompt is where the group's prefill
        # progress says (as for a non-streamed request), not all in this interval.
        return queued_prompt_in(usage, progress[0], progress[1], prompt), units, 0.0
    if usage.streaming:
        prefill_end = usage.first_token_at if usage.first_token_at is not None else end
        # Time to first token is queueing, then prefill: the prefill is its last part.
        prefill_start = prefill_end - prompt / pace.prefill_tokens_per_second
        if prefill_from is not None and usage.first_token_at is not None and t0 < usage.first_token_at:
            # The steps that carried its chunks last longer than the pace says (each also
            # decodes the batch): the prompt's work is spread over all of them. (Not
            # looked up for the intervals after its first token: none of it is there.)
            stepped = prefill_from(usage.opened_at, _queued_behind(usage), usage.first_token_at, prompt)
            prefill_start = prefill_start if stepped is None else min(prefill_start, stepped)
        prefill_start = max(usage.opened_at, prefill_start)
        output = binned_output
        sampled = usage.sampled_output_tokens
        if usage.output_tokens is not None and sampled > 0:
            output *= usage.output_tokens / sampled  # chunks are not always one token each
        if usage.closed_at is not None and usage.first_token_at is not None and usage.last_token_at is not None:
            stepped = stepped_output(usage, usage.first_token_at, usage.last_token_at, t0, t1, steps_by)
            output = output if stepped is None else stepped
        decoding = overlap(prefill_end, end, t0, t1) if usage.first_token_at is not None else 0.0
        return _spread(prompt, prefill_start, prefill_end, t0, t1), units + output, decoding
    # Not streamed: prefill where the group's progress passed its prompt, decode from
    # then to the end, its output tokens (known at the end) spread over that.
    done = usage.prefill_done_at
    if usage.queue_to_tokens > usage.queue_from_tokens:
        prompt_part = queued_prompt_in(usage, progress[0], progress[1], prompt)
    else:  # no estimate at arrival: prefill from the start at the learned pace
        done = min(end, usage.opened_at + prompt / pace.prefill_tokens_per_second)
        prompt_part = _spread(prompt, usage.opened_at, done, t0, t1)
    if usage.prefill_seconds is not None and usage.closed_at is not None:
        # The server said how long its prefill took (Ollama, llama.cpp): that long, up to
        # where progress passed it (or from the start).
        done = min(end, done if done is not None else usage.opened_at + usage.prefill_seconds)
        prompt_part = _spread(prompt, max(usage.opened_at, done - usage.prefill_seconds), done, t0, t1)
    if usage.token_ends is not None:  # the steps showed when its tokens were made
        ends = usage.token_ends
        # Its first token ended its prefill, as a stream's does: its prompt was in the
        # steps before that, not where the group's progress, inferred from energy, put it
        # (where the steps do not show it, progress stands).
        start = None
        if usage.prefill_seconds is not None:
            start = ends[0] - usage.prefill_seconds
        elif prefill_from is not None:
            start = prefill_from(usage.opened_at, _queued_behind(usage), ends[0], prompt)
        if start is not None:
            prompt_part = _spread(prompt, max(usage.opened_at, start), ends[0], t0, t1)
        stepped = stepped_output(usage, ends[0], ends[-1], t0, t1, steps_by)
        output = float(bisect_right(ends, t1) - bisect_right(ends, t0)) if stepped is None else stepped
        return prompt_part, units + output, overlap(ends[0], end, t0, t1)
    if done is None or usage.work_units is not None or (usage.closed_at is not None and not usage.output_tokens):
        return prompt_part, units, 0.0  # not decoding (yet): queued, an image, an embedding
    output = _spread(usage.output_tokens or 0, done, end, t0, t1) if usage.closed_at is not None else 0.0
    return prompt_part, units + output, overlap(done, end, t0, t1)


def context_tokens(usage: RequestUsage, decode_start: float, end: float, at: float) -> float:
    """Tokens in the request's KV cache at `at`: its prompt and what it generated so far."""
    prompt = usage.prompt_tokens if usage.prompt_tokens is not None else usage.prompt_tokens_estimate
    if usage.streaming:
        return prompt + usage.sampled_output_tokens
    if usage.output_tokens and end > decode_start:
        return prompt + usage.output_tokens * min(1.0, max(0.0, (at - decode_start) / (end - decode_start)))
    return float(prompt)


def decode_work(
    rows: Sequence[tuple[float, float, float]],
    streamed: Sequence[bool],
    output_total: float,
    sequence_seconds: float,
    fallback_tokens_per_second: float,
) -> list[float]:
    """Each member's decode work in output tokens, from its (prompt, output, seconds in
    the batch) row: a stream's own tokens when only streams decode (its chunks also show
    a stream faster or slower than its batch-mates). A non-streamed request's tokens are
    known only in total, and some intervals hold decoding but no token (a step outlasted
    them); every sequence in the batch makes one token per step, so then the interval's
    output tokens are shared by time in the batch."""
    blind = any(not s and d > 0 for s, (_, _, d) in zip(streamed, rows))
    if output_total > 0 and not blind:
        return [o for _, o, _ in rows]
    decoded = math.fsum(o for _, o, d in rows if d > 0)  # work units are no decode tokens
    if decoded > 0 and sequence_seconds > 0:
        tokens_per_second = decoded / sequence_seconds
    else:
        tokens_per_second = fallback_tokens_per_second
    return [d * tokens_per_second if d > 0 else o for _, o, d in rows]


def split_dynamic(dynamic_joules: float, works: Sequence[float], presence: Sequence[float]) -> tuple[list[float], float]:
    """Dynamic joules per member in proportion to work; with no work, by presence; with
    nobody present, all of it to idle (the second value)."""
    total_work = sum(works)
    if total_work > 0:
        return [dynamic_joules * w / total_work for w in works], 0.0
    total_presence = sum(presence)
    if total_presence > 0:
        return [dynamic_joules * p / total_presence for p in presence], 0.0
    return [0.0] * len(works), dynamic_joules


def unpaid_prompts(dynamic_joules: float, prompt_joules: Sequence[float], decode_work: Sequence[float]) -> list[float]:
    """What split_priced could not pay of each prompt's price: an interval that drew less
    than its prompts' price scales them down. The energy was drawn, but stamped in a
    neighbouring interval (a counter read's time is known to half a poll) where the batch
    took it; carried over, the next interval the request is in pays it first (prompts
    were 2% of their price short, bench curve seeds)."""
    prefill = sum(prompt_joules)
    if prefill <= 0 or sum(decode_work) <= 0 or dynamic_joules >= prefill:
        return [0.0] * len(prompt_joules)
    short = 1.0 - max(0.0, dynamic_joules) / prefill
    return [p * short for p in prompt_joules]


def split_priced(
    dynamic_joules: float, prompt_joules: Sequence[float], decode_work: Sequence[float], presence: Sequence[float]
) -> tuple[list[float], float]:
    """Prompt tokens at their learned price, the decoding batch shares the rest.

    This is the work split with the interval's own prefill weight: joules per prompt
    token over the joules per output token left once prompts are paid. Only when the
    interval drew less than its prompts' price are they scaled down (and decode gets
    nothing). Paying prompts their price, rather than scaling everything by the
    interval's energy, keeps a prompt that the proxy placed in a neighbouring interval
    (it cannot see exactly when the server prefilled) from taking that interval's level.
    """
    prefill = sum(prompt_joules)
    decode = sum(decode_work)
    if prefill <= 0 or decode <= 0:
        works = [p + d for p, d in zip(prompt_joules, decode_work)]
        return split_dynamic(dynamic_joules, works, presence)
    scale = min(1.0, dynamic_joules / prefill)
    rest = (dynamic_joules - prefill * scale) / decode
    return [p * scale + d * rest for p, d in zip(prompt_joules, decode_work)], 0.0
