"""Aumann-Shapley prices per engine step, from the step ends streams show.

Power is a function of each *step's* work (one forward pass: a chunk of prompt tokens
and one output token per decoding sequence), not of a meter interval's average work. A
meter interval (20-100 ms) often holds a long step that carries a prefill chunk and
short decode-only steps: under a concave (saturating) cost function the long step's
work is dearer per unit (lower work rate, same power), and its prompt tokens are the
reason it is long. Pricing the whole interval at its mean rates gives prompts the
cheaper average price: long prompts come out undercharged and short ones overcharged.

What the proxy sees of steps: every decoding stream gets a token at the end of each
step, so the times its tokens pass are step ends, and a gap wider than a decode-only
step is a step that carried prefill (its extra length is the chunk's time). The
interval is cut at those ends; in each piece, decode work is the batch's share of the
step it belongs to (one token per sequence per step) and prompt work follows the
step's extra length; each piece is priced at its own rates, and the interval's price
per unit of each kind is the average over the pieces, weighted by where that kind of
work was. With a separable (additive) cost function the prices do not depend on the
rates, so this changes nothing there. With no stream decoding, no step end is seen:
the steps are inferred from what streams taught earlier (a decode-only step's length,
the seconds a prompt token adds to a step), see unseen_step_rates.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque
from typing import Callable, Mapping, Sequence

from proxy.attribution.costmodel import Prices, Rates

MIN_STEP_SECONDS = 1e-4
"""Step ends closer than this are one step end (two streams' tokens of the same step)."""
KEEP_STEP_ENDS = 8192
"""Step ends remembered (minutes of traffic): an interval settles once its last member
closes, and then the step ends around it are looked up."""
LONGEST_STEP_SECONDS = 2.0
"""A gap between step ends longer than this is no step (no stream was decoding)."""


class StepEnds:
    """The step ends a device group's streams showed, in time order."""

    def __init__(self) -> None:
        self._ends: list[float] = []

    @property
    def last(self) -> float | None:
        return self._ends[-1] if self._ends else None

    def add(self, times: Sequence[float]) -> list[float]:
        """Adds step ends; returns those that extend the sequence (the steps that just ended)."""
        ends = self._ends
        added: list[float] = []
        for t in sorted(times):
            if ends and t <= ends[-1] + MIN_STEP_SECONDS:
                if t < ends[-1] - MIN_STEP_SECONDS:
                    insort(ends, t)  # late and out of order (rare): keep the order
                continue
            ends.append(t)
            added.append(t)
        if len(ends) > KEEP_STEP_ENDS:
            del ends[: len(ends) - KEEP_STEP_ENDS // 2]
        return added

    def steps_by(self, t: float) -> float | None:
        """Steps the server had done by `t`, the one in progress counted by the part of
        it gone (what a decoding sequence's work was by then). None where the step
        around `t` is not known. Only differences of two counts taken together mean
        anything (old ends are forgotten)."""
        ends = self._ends
        i = bisect_right(ends, t)
        if i > 0 and t - ends[i - 1] <= MIN_STEP_SECONDS:
            return float(i)
        if i == 0 or i == len(ends) or ends[i] - ends[i - 1] > LONGEST_STEP_SECONDS:
            return None
        return i + (t - ends[i - 1]) / (ends[i] - ends[i - 1])

    def token_ends(self, count: int, start: float, end: float) -> list[float] | None:
        """When a sequence that decoded until `end` made its `count` tokens: the last
        `count` step ends up to `end` (every step makes one token per decoding sequence,
        the last at its end). None where the steps are not all known: fewer ends than
        tokens after `start`, or a gap longer than a step lasts (no stream was decoding)."""
        ends = self._ends
        j = bisect_right(ends, end + MIN_STEP_SECONDS)
        i = j - count
        if count <= 0 or i < 0 or ends[i] < start or end - ends[j - 1] > LONGEST_STEP_SECONDS:
            return None
        placed = ends[i:j]
        if any(b - a > LONGEST_STEP_SECONDS for a, b in zip(placed, placed[1:])):
            return None
        return placed

    def prefill_start(
        self,
        arrived_at: float,
        queued_behind: float | None,
        first_token_at: float,
        chunk_seconds: float,
        shortest_step_seconds: float,
        longest_step_seconds: float | None,
    ) -> float | None:
        """Where the steps that carried a prompt began: a stream's first token ends the
        step that finished its prompt, and the steps before it carried the rest, each
        beyond a decode-only step's length. Walks back until `chunk_seconds` of excess
        are covered, never to a step that began before the request arrived (it joined
        the next one) or that ended before `queued_behind`, the end of the prefill
        queued before it (first come, first served: the step that ended that one's
        may have begun this one's). None where the steps are not known."""
        ends = self._ends
        j = bisect_right(ends, first_token_at + MIN_STEP_SECONDS) - 1
        if j < 1 or first_token_at - ends[j] > MIN_STEP_SECONDS:
            return None
        need = chunk_seconds
        while j >= 1:
            start, end = ends[j - 1], ends[j]
            if end - start > LONGEST_STEP_SECONDS:
                return None
            if start < arrived_at or (queued_behind is not None and end < queued_behind - MIN_STEP_SECONDS):
                return end
            excess = max(0.0, end - start - shortest_step_seconds)
            if excess >= need:
                # The step that held the prompt's first chunk: all of it (a step's power
                # is even over it), unless it is longer than steps last, i.e. a gap in
                # which no stream decoded to show the steps: then its last part.
                if longest_step_seconds is None or end - start <= longest_step_seconds + MIN_STEP_SECONDS:
                    return start
                return max(start, end - need - shortest_step_seconds)
            need -= excess
            j -= 1
        return None

    def around(self, t0: float, t1: float) -> tuple[float | None, list[float], float | None]:
        """(the last end at or before t0, the ends inside (t0, t1), the first end at or
        after t1); None where not known or too far to be the same step."""
        ends = self._ends
        if not ends or t0 < ends[0]:
            return None, [], None
        i = bisect_right(ends, t0)
        j = bisect_left(ends, t1, lo=i)
        inside = ends[i:j]
        before = ends[i - 1] if i > 0 else None
        after = ends[j] if j < len(ends) else None
        first = inside[0] if inside else t1
        last = inside[-1] if inside else t0
        if before is not None and first - before > LONGEST_STEP_SECONDS:
            before = None
        if after is not None and after - last > LONGEST_STEP_SECONDS:
            after = None
        return before, inside, after


def step_prices(
    price_at: Callable[[Rates], Prices],
    t0: float,
    t1: float,
    around: tuple[float | None, list[float], float | None],
    shortest_step_seconds: float | None,
    rates: Rates,
    seconds_per_prompt_token: float | None = None,
) -> Prices:
    """The interval's AS prices as the work-weighted average of its pieces' prices.

    `around`: StepEnds.around(t0, t1); `shortest_step_seconds`: a decode-only step's
    length (the part of a longer step beyond it is prefill). Where the steps on both
    sides are known, the decode work is the batch's tokens in those steps (a step that
    carries a chunk makes its tokens slowly), not the interval's average. Where no
    stream shows them, see unseen_step_rates (`seconds_per_prompt_token`: what a prompt
    token adds to a step, PrefillSteps.seconds_per_token)."""
    before, ends, after = around
    duration = t1 - t0
    if duration <= 0 or rates.batch <= 0:
        return price_at(rates)
    if not ends and (before is None or after is None):
        return price_at(unseen_step_rates(rates, shortest_step_seconds, seconds_per_prompt_token))
    bounds = [t0, *ends, t1]
    pieces = list(zip(bounds[:-1], bounds[1:]))
    known = [b - a for a, b in zip(ends[:-1], ends[1:])]
    if before is not None and ends:
        known.append(ends[0] - before)
    if after is not None and ends:
        known.append(after - ends[-1])
    typical = sorted(known)[len(known) // 2] if known else None
    steps: list[float] = []
    for i, (a, b) in enumerate(pieces):
        start = a if i > 0 else before
        end = b if i < len(pieces) - 1 else after
        if start is not None and end is not None:
            steps.append(end - start)
        else:  # a partial step whose other end is not known: a typical length
            steps.append(max(b - a, typical if typical is not None else b - a))
    shortest = min(steps)
    if shortest_step_seconds is not None:
        shortest = min(shortest, shortest_step_seconds)
    # Decode work: the fraction of a step each piece covers. Prompt work: the piece's
    # part of its step's length beyond a decode-only step (a step is long because of its
    # chunk); where no step is longer, by time.
    decode = [(b - a) / s for (a, b), s in zip(pieces, steps)]
    prompt = [(b - a) * max(0.0, 1.0 - shortest / s) for (a, b), s in zip(pieces, steps)]
    if sum(prompt) <= 0:
        prompt = [b - a for a, b in pieces]
    decode_total, prompt_total = sum(decode), sum(prompt)
    output = rates.output_per_second * duration
    context = rates.context_per_second * duration
    if before is not None and after is not None and output > 0:
        # One token per decoding sequence per step.
        steps_output = rates.batch * decode_total
        context *= steps_output / output
        output = steps_output
    prompt_tokens = rates.prompt_per_second * duration
    prompt_price = output_price = context_price = batch_price = 0.0
    for (a, b), d, p in zip(pieces, decode, prompt):
        seconds = b - a
        if seconds <= 0:
            continue
        dw, pw = d / decode_total, p / prompt_total
        prices = price_at(Rates(prompt_tokens * pw / seconds, output * dw / seconds, context * dw / seconds, rates.batch))
        prompt_price += pw * prices.prompt
        output_price += dw * prices.output
        context_price += dw * prices.context
        batch_price += seconds / duration * prices.batch_second
    return Prices(prompt_price, output_price, context_price, batch_price)


MOST_PREFILL_FRACTION = 0.95
"""Of an interval's time spent on prompt chunks beyond the decode-only steps: every step
still makes a token per decoding sequence, however long its chunk."""


def unseen_step_rates(rates: Rates, shortest_step_seconds: float | None, seconds_per_prompt_token: float | None) -> Rates:
    """The rates of the steps that carried an interval's prompt work, where no stream
    showed the steps (only non-streamed requests decode).

    A non-streamed request's output is known only in total and is spread over its
    decode, i.e. at its lifetime's mean token rate; but while the server prefills, each
    step also carries a chunk and lasts longer, so the batch makes its tokens slower
    there. At the mean rate the interval's load looks higher than that of the steps its
    prompt ran in, and under a saturating cost function the prompt gets a lower price
    than the steps charged (-39% for 4000-token prompts beside 24 decoding sequences).
    Each step makes one token per decoding sequence and lasts a decode-only step plus
    its chunk's time, so the steps in the interval are its time less the prompt tokens'
    time, over a decode-only step; the prompt is spread over those steps. The output
    is never raised above what was counted (a decode-only step is longer at a larger
    batch than the shortest seen)."""
    if (
        shortest_step_seconds is None
        or seconds_per_prompt_token is None
        or shortest_step_seconds <= 0
        or rates.prompt_per_second <= 0
        or rates.output_per_second <= 0
    ):
        return rates
    prefill_fraction = min(MOST_PREFILL_FRACTION, rates.prompt_per_second * seconds_per_prompt_token)
    output = min(rates.output_per_second, rates.batch * (1.0 - prefill_fraction) / shortest_step_seconds)
    scale = output / rates.output_per_second
    return Rates(rates.prompt_per_second, output, rates.context_per_second * scale, rates.batch)


SHORTEST_WINDOW = 400
"""Steps over which the shortest is taken as a decode-only step (seconds of traffic)."""
PREFILL_PERCENTILE = 0.1
"""Of streams' step excess per prompt token: a stream that queued behind other prompts
shows their chunks too, so a low percentile is its own."""
LONGEST_PERCENTILE = 0.95
MIN_PROMPT_TOKENS = 256
MIN_STREAMS = 10


class PrefillSteps:
    """How many prompt tokens the server processed, read from its step lengths.

    A step that carries a prefill chunk is longer than a decode-only one by about the
    chunk's compute time: extra seconds per prompt token are learned from streams (the
    steps before a stream's first token carry its prompt), then the extra length of the
    steps in an interval says how many prompt tokens it processed, however saturated
    the power is (energy says little there)."""

    def __init__(self, ends: StepEnds) -> None:
        self._ends = ends
        self._lengths: deque[float] = deque(maxlen=SHORTEST_WINDOW)
        self._per_token: deque[float] = deque(maxlen=256)
        self._seconds_per_token: float | None = None
        self._longest: float | None = None

    def observe_steps(self, new_ends: Sequence[float], previous_end: float | None) -> None:
        """Lengths of the steps that just ended."""
        last = previous_end
        for end in new_ends:
            if last is not None and 0 < end - last <= LONGEST_STEP_SECONDS:
                self._lengths.append(end - last)
                self._longest = None
            last = end

    def shortest(self) -> float | None:
        return min(self._lengths) if self._lengths else None

    def longest(self) -> float | None:
        """A high percentile of recent step lengths: a chunk step's length, not a gap's
        in which no stream decoded (those are few)."""
        if len(self._lengths) < MIN_STREAMS:
            return None
        if self._longest is None:
            self._longest = _quantile(self._lengths, LONGEST_PERCENTILE)
        return self._longest

    def excess_seconds(self, t0: float, t1: float, ongoing: bool = False) -> float | None:
        """Seconds in [t0, t1] that steps spent beyond a decode-only step's length (each
        step's first `shortest` seconds are its decode part, the rest its chunk's).
        `ongoing`: a step is still running at t1 (a stream is decoding), so its part so
        far counts too, as soon as it outlasts a decode-only step."""
        shortest = self.shortest()
        if shortest is None:
            return None
        before, inside, after = self._ends.around(t0, t1)
        ends = inside + ([after] if after is not None and after <= t1 + MIN_STEP_SECONDS else [])
        total = 0.0
        last = before
        for end in ends:
            if last is not None and end - last <= LONGEST_STEP_SECONDS:
                total += max(0.0, min(end, t1) - max(last + shortest, t0))
            last = end
        if ongoing and last is not None and t1 - last <= LONGEST_STEP_SECONDS:
            total += max(0.0, t1 - max(last + shortest, t0))
        return total

    def observe_stream(self, prompt_tokens: float, opened_at: float, first_token_at: float) -> None:
        if prompt_tokens < MIN_PROMPT_TOKENS:
            return
        excess = self.excess_seconds(opened_at, first_token_at)
        if excess is not None and excess > 0:
            self._per_token.append(excess / prompt_tokens)
            self._seconds_per_token = None

    def seconds_per_token(self) -> float | None:
        if len(self._per_token) < MIN_STREAMS:
            return None
        if self._seconds_per_token is None:
            self._seconds_per_token = _quantile(self._per_token, PREFILL_PERCENTILE)
        return self._seconds_per_token

    def state(self) -> dict[str, list[float]]:
        """What was learned (step lengths, seconds per prompt token), to persist."""
        return {"step_lengths": list(self._lengths), "seconds_per_prompt_token": list(self._per_token)}

    def load(self, state: Mapping[str, Sequence[float]]) -> None:
        self._lengths.extend(float(v) for v in state.get("step_lengths", ()) if v > 0)
        self._longest = None
        self._per_token.extend(float(v) for v in state.get("seconds_per_prompt_token", ()) if v > 0)
        self._seconds_per_token = None

    def processed_tokens(self, t0: float, t1: float) -> float | None:
        """Prompt tokens processed in [t0, t1] while a stream decodes; None when unknown."""
        per_token = self.seconds_per_token()
        if per_token is None or per_token <= 0:
            return None
        excess = self.excess_seconds(t0, t1, ongoing=True)
        return None if excess is None else excess / per_token


def _quantile(values: Sequence[float], q: float) -> float:
    """The value at quantile q of a non-empty sample (the lower one of a pair)."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]
