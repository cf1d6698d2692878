"""Where a device group processed its prompts, as the engine measures it per interval.

Two sources (prefill.py holds the first-come-first-served queue they advance):
- the group's prefill progress over a meter interval: requests that showed their prefill
  done (a stream's first token, a request's end less its decoding) move it on, and the
  rest is measured, from the steps' extra length while a stream decodes, else from the
  energy the learned cost model says decoding did not draw (advance_progress);
- for a request whose prefill end a step shows, the steps before it that carried its
  prompt (prefill_steps_from, steps.StepEnds.prefill_start).
"""

from __future__ import annotations

from array import array

from proxy.attribution.costmodel import Rates, slope, unsaturate
from proxy.attribution.group import DEFAULT_DECODE_SECONDS_PER_TOKEN, Group
from proxy.attribution.prefill import ProgressSpan
from proxy.attribution.split import PrefillFrom, context_tokens, overlap
from proxy.attribution.timing import Pace
from proxy.attribution.usage import RequestUsage

DEFAULT_FASTEST_DECODE_SECONDS_PER_TOKEN = 0.01
"""Until learned from streams: a sequence decodes no faster than this (100 tokens/s)."""
PREFILL_PACE_MARGIN = 1.5
"""Prefill progress inferred from power is capped at this times the learned pace."""


def prefill_done_before_end(group: Group, usage: RequestUsage) -> float:
    """A closed request that made n output tokens was done prefilling some n steps
    before its end (a stream with no token seen: by its end)."""
    assert usage.closed_at is not None
    fastest = group.pace.pace().fastest_decode_seconds_per_token or DEFAULT_FASTEST_DECODE_SECONDS_PER_TOKEN
    decoded = 0.0 if usage.streaming else (usage.output_tokens or 0) * fastest
    return max(usage.opened_at, usage.closed_at - decoded)


def advance_progress(
    group: Group, t0: float, t1: float, members: list[RequestUsage], binned: array, dynamic_joules: float
) -> ProgressSpan:
    """Advance the group's prefill progress over [t0, t1]: requests that showed their
    prefill done jump it, the energy not drawn by decoding measures the rest."""
    prefill = group.prefill
    for usage in members:
        first = usage.first_token_at
        if first is not None and t0 < first <= t1:
            prefill.done_by(usage, first)
            usage.prefill_done_at = first  # exact, even where progress passed it earlier
    for usage in group.closed_since_sample:
        end = usage.closed_at
        if end is not None and end <= t1 and usage.prefill_done_at is None:
            prefill.done_by(usage, prefill_done_before_end(group, usage))
    model = group.model
    decoding_stream = any(u.streaming and u.first_token_at is not None and u.first_token_at < t1 for u in members)
    from_steps = group.prefill_steps.processed_tokens(t0, t1) if decoding_stream else None
    if from_steps is not None and (group.fixed_prefill_weight is not None or not model.ready):
        # Streams show the steps: their extra length is the prompt tokens processed.
        processed = from_steps
    elif group.fixed_prefill_weight is not None or not model.ready:
        processed = group.pace.pace().prefill_tokens_per_second * (t1 - t0)
    else:
        # Prompt tokens are what the model says the energy not drawn by decoding bought.
        pace = group.pace.pace()
        tokens_per_second = 1.0 / (pace.decode_seconds_per_token or DEFAULT_DECODE_SECONDS_PER_TOKEN)
        sequence_seconds = output = context = 0.0
        for usage, seen in zip(members, binned):
            start = usage.first_token_at if usage.streaming else usage.prefill_done_at
            if start is not None:
                end = usage.closed_at if usage.closed_at is not None else t1
                decoding = overlap(start, end, t0, t1)
                sequence_seconds += decoding
                tokens = seen if usage.streaming else decoding * tokens_per_second
                output += tokens
                context += tokens * context_tokens(usage, start, end, (t0 + t1) / 2)
        duration = t1 - t0
        rates = Rates(0.0, output / duration, context / duration, sequence_seconds / duration)
        # Never faster than the learned prefill throughput: near saturation a small
        # change of power inverts to a large change of prompt tokens.
        most = pace.prefill_tokens_per_second * PREFILL_PACE_MARGIN
        processed = min(model.prompt_rate_for(dynamic_joules / duration, rates), most) * duration
        if from_steps is not None:
            # Energy measures prompt work as well as the cost function still bends
            # with load (its slope g'); where power saturates it says little, and
            # the steps' extra length (streams show it) says it instead.
            fit = model.fit
            assert fit is not None
            bend = slope(unsaturate(max(0.0, dynamic_joules / duration), fit.saturation_watts), fit.saturation_watts)
            processed = bend * processed + (1.0 - bend) * from_steps
    return prefill.advance(t0, t1, processed)


def prefill_steps_from(group: Group, pace: Pace) -> PrefillFrom:
    """Where a prefill that ended at a step end began, by the steps streams showed:
    its prompt's compute time (learned from step lengths, else the prefill pace)
    beyond decode-only steps (steps.StepEnds.prefill_start). What the steps taught is
    read at the first call only: most intervals place no prompt."""
    learned: list[tuple[float, float, float | None] | None] = []

    def prefill_from(arrived: float, behind: float | None, end: float, prompt: float) -> float | None:
        if not learned:
            steps = group.prefill_steps
            shortest = steps.shortest()
            per_token = steps.seconds_per_token() or 1.0 / pace.prefill_tokens_per_second
            learned.append(None if shortest is None else (shortest, per_token, steps.longest()))
        known = learned[0]
        if known is None:
            return None
        shortest, per_token, longest = known
        return group.step_ends.prefill_start(arrived, behind, end, prompt * per_token, shortest, longest)

    return prefill_from
