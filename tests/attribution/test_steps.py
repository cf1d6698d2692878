"""Steps read from streamed token times (proxy/attribution/steps.py): per-step AS prices
and prefill progress from the steps' extra length, on scripted schedules with exact answers."""

from __future__ import annotations

import math

import pytest

from proxy.attribution.costmodel import Fit, Rates
from proxy.attribution.split import known_work, stepped_output
from proxy.attribution.steps import PrefillSteps, StepEnds, step_prices, unseen_step_rates
from proxy.attribution.timing import Pace
from proxy.attribution.usage import RequestUsage

DECODE_STEP_SECONDS = 0.02
SECONDS_PER_PROMPT_TOKEN = 0.0002
CHUNK_TOKENS = 512


def _curve(e0: float, w: float, saturation_watts: float) -> tuple[Fit, float, float, float]:
    """P = P_sat (1 - exp(-e0 r / P_sat)) of r = w x prompt/s + output/s, as a Fit (its
    loads are per 1000 tokens/s)."""
    return Fit((e0 * w * 1000.0, e0 * 1000.0, 0.0, 0.0, 0.0, 0.0), -saturation_watts), e0, w, saturation_watts


def test_a_chunk_step_beside_decode_steps_is_priced_at_its_own_rates() -> None:
    fit, e0, w, p_sat = _curve(1.5, 0.2, 400.0)
    batch = 30
    chunk_seconds = DECODE_STEP_SECONDS + CHUNK_TOKENS * SECONDS_PER_PROMPT_TOKEN
    ends = StepEnds()
    # A decode step, a step carrying a 512-token chunk, then decode steps; the interval
    # [0, 0.2] holds the chunk step, three decode steps and 90% of a fourth.
    times = [-DECODE_STEP_SECONDS, 0.0, chunk_seconds]
    while times[-1] < 0.2:
        times.append(times[-1] + DECODE_STEP_SECONDS)
    ends.add(times)
    t0, t1 = 0.0, 0.2
    decode_steps = (t1 - chunk_seconds) / DECODE_STEP_SECONDS
    output_tokens = batch * (1 + decode_steps)
    rates = Rates(CHUNK_TOKENS / (t1 - t0), output_tokens / (t1 - t0), 0.0, batch)
    prices = step_prices(fit.prices, t0, t1, ends.around(t0, t1), DECODE_STEP_SECONDS, rates)

    def watts(units_per_second: float) -> float:
        return p_sat * -math.expm1(-e0 * units_per_second / p_sat)

    # Truth: within a step every unit pays the same (power depends on total work only).
    chunk_units = w * CHUNK_TOKENS + batch
    chunk_joules = watts(chunk_units / chunk_seconds) * chunk_seconds
    prompt_truth = chunk_joules * w * CHUNK_TOKENS / chunk_units
    decode_truth = chunk_joules * batch / chunk_units + watts(batch / DECODE_STEP_SECONDS) * DECODE_STEP_SECONDS * decode_steps
    assert prices.prompt * CHUNK_TOKENS == pytest.approx(prompt_truth, rel=0.01)
    assert prices.output * output_tokens == pytest.approx(decode_truth, rel=0.01)
    # The interval's mean rates (what the engine priced at before) undercharge the prompt.
    mean = fit.prices(rates)
    assert mean.prompt * CHUNK_TOKENS < 0.9 * prompt_truth


def _schedule(prompts: list[int], gap_steps: int = 5) -> tuple[list[float], list[tuple[int, float, float]], list[tuple[float, float, int]]]:
    """Step ends of a server that prefills each prompt in 512-token chunks (one step per
    chunk, beside the decoding batch) with decode-only steps between; per prompt (tokens,
    arrival, first token); per chunk step (start, end, tokens)."""
    t = 0.0
    ends = [t]
    streams: list[tuple[int, float, float]] = []
    chunks: list[tuple[float, float, int]] = []
    for tokens in prompts:
        arrival = t
        left = tokens
        while left > 0:
            take = min(CHUNK_TOKENS, left)
            start, t = t, t + DECODE_STEP_SECONDS + take * SECONDS_PER_PROMPT_TOKEN
            chunks.append((start, t, take))
            ends.append(t)
            left -= take
        streams.append((tokens, arrival, t))
        for _ in range(gap_steps):
            t += DECODE_STEP_SECONDS
            ends.append(t)
    return ends, streams, chunks


def test_prompt_tokens_processed_are_read_from_the_steps_extra_length() -> None:
    prompts = [300, 1200, 4000, 700, 2600, 512, 900, 3300, 1500, 450, 2000, 800]
    times, streams, chunks = _schedule(prompts)
    ends = StepEnds()
    steps = PrefillSteps(ends)
    steps.observe_steps(ends.add(times), None)
    for tokens, arrival, first in streams:
        steps.observe_stream(tokens, arrival, first)
    assert steps.seconds_per_token() == pytest.approx(SECONDS_PER_PROMPT_TOKEN, rel=0.01)
    # Over any stretch, the prompt tokens the chunk steps in it processed (each step's
    # chunk after its decode part, as the reading assumes).
    for t0, t1 in ((0.0, times[-1]), (1.0, 2.0), (0.37, 0.41), (2.5, 3.6)):
        exact = math.fsum(
            take * max(0.0, min(end, t1) - max(start + DECODE_STEP_SECONDS, t0)) / (end - start - DECODE_STEP_SECONDS)
            for start, end, take in chunks
        )
        assert steps.processed_tokens(t0, t1) == pytest.approx(exact, rel=0.01, abs=0.5), (t0, t1)


def test_where_no_stream_shows_the_steps_the_batch_makes_its_tokens_at_the_steps_pace() -> None:
    # Only non-streamed sequences decode: no step end is seen, and their output, known
    # in total, is counted at their lifetime's mean rate (mostly decode-only steps: 24
    # tokens every 20 ms). While a long prompt prefills, every step carries a 512-token
    # chunk and lasts 20 ms + 512 x 0.2 ms: the batch makes 24 tokens per such step.
    batch = 24
    chunk_step_seconds = DECODE_STEP_SECONDS + CHUNK_TOKENS * SECONDS_PER_PROMPT_TOKEN
    counted = Rates(CHUNK_TOKENS / chunk_step_seconds, batch / DECODE_STEP_SECONDS, 0.0, batch)
    rates = unseen_step_rates(counted, DECODE_STEP_SECONDS, SECONDS_PER_PROMPT_TOKEN)
    assert rates.output_per_second == pytest.approx(batch / chunk_step_seconds, rel=1e-9)
    assert rates.prompt_per_second == counted.prompt_per_second and rates.batch == batch
    # Priced there, under a saturating curve, the prompt pays what its steps drew.
    fit, e0, w, p_sat = _curve(1.5, 0.2, 400.0)
    units = w * CHUNK_TOKENS + batch
    step_watts = p_sat * -math.expm1(-e0 * units / chunk_step_seconds / p_sat)
    prompt_truth = step_watts * chunk_step_seconds * w * CHUNK_TOKENS / units
    around = StepEnds().around(0.0, 1.0)  # nothing seen
    prices = step_prices(fit.prices, 0.0, 1.0, around, DECODE_STEP_SECONDS, counted, SECONDS_PER_PROMPT_TOKEN)
    assert prices.prompt * CHUNK_TOKENS == pytest.approx(prompt_truth, rel=0.01)
    assert fit.prices(counted).prompt * CHUNK_TOKENS < 0.8 * prompt_truth  # at the counted rate
    # Nothing to correct without prompt work, or without knowing the steps; never more
    # output than counted (a decode-only step at this batch may be longer than the shortest).
    decode_only = Rates(0.0, batch / DECODE_STEP_SECONDS, 0.0, batch)
    assert unseen_step_rates(decode_only, DECODE_STEP_SECONDS, SECONDS_PER_PROMPT_TOKEN) == decode_only
    assert unseen_step_rates(counted, None, SECONDS_PER_PROMPT_TOKEN) == counted
    assert unseen_step_rates(counted, DECODE_STEP_SECONDS, None) == counted
    slow = Rates(100.0, 10.0, 0.0, batch)
    assert unseen_step_rates(slow, DECODE_STEP_SECONDS, SECONDS_PER_PROMPT_TOKEN).output_per_second == 10.0


def _ends_with_chunk_steps(steps: int, chunked: range) -> tuple[StepEnds, list[float], float]:
    """Step ends from 0: 20 ms decode-only steps, those in `chunked` carrying a 512-token
    chunk (122 ms); returns the StepEnds, the times and a chunk step's length."""
    chunk_seconds = DECODE_STEP_SECONDS + CHUNK_TOKENS * SECONDS_PER_PROMPT_TOKEN
    times = [0.0]
    for k in range(steps):
        times.append(times[-1] + (chunk_seconds if k in chunked else DECODE_STEP_SECONDS))
    ends = StepEnds()
    ends.add(times)
    return ends, times, chunk_seconds


def test_a_non_streamed_sequence_made_its_tokens_at_the_last_steps_streams_showed() -> None:
    # Streams show every step's end: decode-only steps, and steps that carry a chunk
    # (five times longer). A non-streamed sequence in the batch made one token per step,
    # its last at its end; where steps went unseen (no stream decoding), its tokens are
    # not placed.
    ends, times, _ = _ends_with_chunk_steps(40, range(10, 20))
    # 25 tokens, arrived at 0.1, the last one at the 40th step's end.
    placed = ends.token_ends(25, 0.1, times[-1])
    assert placed == times[-25:]
    # As many tokens as an even spread over its life would put in the chunk steps' span:
    even = 25 * (times[20] - times[15]) / (times[-1] - times[15])
    assert sum(1 for t in placed if times[15] < t <= times[20]) == 5 < even
    assert ends.token_ends(25, times[-25] + 0.001, times[-1]) is None  # more tokens than steps since it arrived
    silent = StepEnds()
    silent.add(times[:30] + [t + 3.0 for t in times[30:]])  # three seconds with no stream decoding
    assert silent.token_ends(25, 0.1, times[-1] + 3.0) is None
    assert silent.token_ends(5, 0.1, times[-1] + 3.0) == [t + 3.0 for t in times[-5:]]


def test_a_token_is_the_work_of_the_step_that_ended_with_it() -> None:
    # Decode steps of 20 ms, then three steps that carry 512-token chunks (122 ms each),
    # read by a meter every 50 ms: some intervals hold no step end at all. Each token
    # is spread over its step, so such an interval holds part of a token (the work the
    # batch did in it) and the request's tokens add up exactly.
    ends, times, chunk_seconds = _ends_with_chunk_steps(30, range(10, 13))
    assert ends.steps_by(times[4]) - ends.steps_by(times[1]) == pytest.approx(3.0)
    inside = (times[11] + 0.01, times[11] + 0.06)  # within one chunk step
    assert ends.steps_by(inside[1]) - ends.steps_by(inside[0]) == pytest.approx(0.05 / chunk_seconds)
    usage = RequestUsage("g", 0.0, streaming=True, closed_at=times[-1], first_token_at=times[0], last_token_at=times[-1])
    usage.output_tokens = 30
    cuts = [i * 0.05 for i in range(int(times[-1] / 0.05) + 2)]
    parts = [stepped_output(usage, times[0], times[-1], a, b, ends.steps_by) for a, b in zip(cuts, cuts[1:])]
    assert all(p is not None for p in parts)
    assert math.fsum(parts) == pytest.approx(30.0)  # type: ignore[arg-type]
    assert stepped_output(usage, times[0], times[-1], *inside, ends.steps_by) == pytest.approx(0.05 / chunk_seconds)
    assert ends.steps_by(times[-1] + 1.0) is None  # the step in progress is not known yet


def test_a_prompt_was_prefilled_in_the_chunk_steps_before_its_first_token() -> None:
    # Steps 10-19 carry 512-token chunks (122 ms: 20 ms of decoding, 102 ms of prompt).
    # A 1536-token prompt whose first token ended step 20 filled steps 17-19; a
    # 1280-token one, steps 17-19 too (its first chunk shared step 17 with the prompt
    # queued before it: a step's power is even over it); a 100-token prompt, step 19.
    ends, times, chunk_seconds = _ends_with_chunk_steps(40, range(10, 20))
    chunk_compute = CHUNK_TOKENS * SECONDS_PER_PROMPT_TOKEN
    first = times[20]

    def start(arrived: float, behind: float | None, prompt_tokens: float, longest: float | None = chunk_seconds) -> float | None:
        return ends.prefill_start(arrived, behind, first, prompt_tokens * SECONDS_PER_PROMPT_TOKEN, DECODE_STEP_SECONDS, longest)

    assert start(0.0, None, 3 * CHUNK_TOKENS) == pytest.approx(times[17])
    assert start(0.0, None, 2.5 * CHUNK_TOKENS) == pytest.approx(times[17])
    assert start(0.0, None, 100) == pytest.approx(times[19])
    # Nothing before its arrival: it joined the step after the one running then. Nor
    # before the step that ended the prefill queued before it (first come, first served).
    assert start(times[18] - 0.01, None, 3 * CHUNK_TOKENS) == pytest.approx(times[18])
    assert start(0.0, times[18], 3 * CHUNK_TOKENS) == pytest.approx(times[17])
    assert start(0.0, times[19], 3 * CHUNK_TOKENS) == pytest.approx(times[18])
    # A "step" far longer than steps last is a gap no stream showed: its last part only.
    assert start(0.0, None, 100, longest=DECODE_STEP_SECONDS) == pytest.approx(first - 100 * SECONDS_PER_PROMPT_TOKEN - DECODE_STEP_SECONDS)
    # Not at a step end, or before any: not known.
    assert ends.prefill_start(0.0, None, first + 0.01, chunk_compute, DECODE_STEP_SECONDS, None) is None
    assert StepEnds().prefill_start(0.0, None, 1.0, chunk_compute, DECODE_STEP_SECONDS, None) is None


def test_a_non_streamed_prompt_is_placed_before_its_first_token_like_a_streams() -> None:
    # A non-streamed request's tokens sit at the last steps streams showed (token_ends):
    # the first of them ended its prefill, so its prompt ran in the chunk steps before.
    ends, times, _ = _ends_with_chunk_steps(40, range(10, 20))
    usage = RequestUsage("g", 0.0, streaming=False, closed_at=times[-1])
    usage.prompt_tokens, usage.output_tokens = 1536, 21
    usage.token_ends = ends.token_ends(21, 0.0, times[-1])
    assert usage.token_ends is not None and usage.token_ends[0] == times[20]
    per_token = SECONDS_PER_PROMPT_TOKEN

    def prefill_from(arrived: float, behind: float | None, end: float, prompt: float) -> float | None:
        return ends.prefill_start(arrived, behind, end, prompt * per_token, DECODE_STEP_SECONDS, None)

    pace = Pace(prefill_tokens_per_second=1.0 / per_token, decode_seconds_per_token=None, fastest_decode_seconds_per_token=None)
    in_steps = [known_work(usage, times[k], times[k + 1], 0.0, pace, (0.0, 0.0), ends.steps_by, prefill_from)[0] for k in range(40)]
    assert in_steps[17:20] == pytest.approx([512.0, 512.0, 512.0])
    assert math.fsum(in_steps) == pytest.approx(1536.0)
