"""The figure at the end of the response (DESIGN.md section 5, first channel): once the
requests a response shared the device with have reported their work, and whatever the
cost model learned since an interval was metered, the figure a request reads at its end
is the one its receipt will settle to (here with no tail left to predict)."""

from __future__ import annotations

import math
from typing import Callable

import pytest

from proxy.attribution import AttributionEngine, RequestUsage
from proxy.attribution.costmodel import MIN_BLOCKS, Fit
from proxy.meters.base import EnergySample

IDLE_WATTS = 50.0
DYNAMIC_JOULES_PER_INTERVAL = 12.0
STEP_SECONDS = 0.1
# Power saturating in total work (towards 100 W more than idle): a prompt token's price
# depends on how busy the interval was, so a neighbour's unreported output moves it.
SATURATING = Fit(theta=(100.0, 2000.0, 0.0, 0.0, 0.0, 0.0), saturation_watts=100.0)


def _engine(fit: Fit) -> AttributionEngine:
    engine = AttributionEngine({"g": ["0"]}, idle_power_watts=IDLE_WATTS)
    engine._groups["g"].model.set_prior(fit, MIN_BLOCKS)  # as if learned
    return engine


class _Meter:
    def __init__(self, engine: AttributionEngine, start: float = 0.0) -> None:
        self.engine = engine
        self.joules = 0.0
        self.last = start
        engine.on_sample(EnergySample(start, {"0": 0.0}))

    def read(self, t: float) -> None:
        self.joules += (t - self.last) * (IDLE_WATTS + DYNAMIC_JOULES_PER_INTERVAL / STEP_SECONDS)
        self.last = t
        self.engine.on_sample(EnergySample(t, {"0": self.joules}))


def _stream_ticks(usage: RequestUsage, first: float, until: float, every: float = 0.02) -> list[float]:
    return [first + k * every for k in range(int(round((until - first) / every)) + 1)]


def _play(
    meter: _Meter, ticks: dict[RequestUsage, list[float]], readings: list[float], after_reading: Callable[[float], None] = lambda at: None
) -> None:
    """Streams' tokens and meter readings in time order (a token at a reading's instant
    first); `after_reading(at)` runs after each reading (closes, end figures)."""
    events = sorted([(t, 0, u) for u, times in ticks.items() for t in times] + [(t, 1, None) for t in readings], key=lambda e: (e[0], e[1]))
    for at, kind, usage in events:
        if kind == 0:
            usage.tick(1, at)  # type: ignore[union-attr]
        else:
            meter.read(at)
            after_reading(at)


def test_end_figure_counts_the_output_a_neighbour_reported_since() -> None:
    """A stream decodes beside a non-streamed request whose output nobody sees until it
    ends. The stream's prompt is paid at a price that depends on that output; it ends
    after its neighbour reported: its end figure is its settled one."""
    engine = _engine(SATURATING)
    meter = _Meter(engine)
    stream = engine.open("g", 0.0, streaming=True, prompt_tokens_estimate=1000)
    blind = engine.open("g", 0.0, streaming=False, prompt_tokens_estimate=0)
    ticks = _stream_ticks(stream, 0.2, 0.4)  # prompt prefilled in [0, 0.2] at 5,000 tokens/s

    def after_reading(at: float) -> None:
        if math.isclose(at, 0.3):
            engine.close(blind, 0.35, prompt_tokens=0, output_tokens=60)

    _play(meter, {stream: ticks}, [STEP_SECONDS * k for k in range(1, 5)], after_reading)
    engine.close(stream, 0.4, prompt_tokens=1000, output_tokens=len(ticks))
    at_end = engine.provisional(stream, 0.4)[0]
    assert not stream.final
    meter.read(0.5)
    assert stream.final and blind.final
    assert at_end == pytest.approx(stream.energy_joules, rel=0.01)


def test_end_figure_is_priced_by_what_the_model_learned_since() -> None:
    """Intervals metered while the model said prompts were cheap settle at what it says
    when they settle; a request closing in between is priced by the newer model too."""
    cheap = Fit(theta=(5.0, 900.0, 0.0, 0.0, 0.0, 0.0), saturation_watts=math.inf)
    dear = Fit(theta=(20.0, 900.0, 0.0, 0.0, 0.0, 0.0), saturation_watts=math.inf)
    engine = _engine(cheap)
    meter = _Meter(engine)
    long = engine.open("g", 0.0, streaming=True, prompt_tokens_estimate=1000)
    short = engine.open("g", 0.0, streaming=True, prompt_tokens_estimate=0)
    long_ticks = _stream_ticks(long, 0.2, 0.8)
    short_ticks = _stream_ticks(short, 0.02, 1.0)
    _play(meter, {long: long_ticks, short: short_ticks}, [STEP_SECONDS * k for k in range(1, 9)])
    engine._groups["g"].model.set_prior(dear, MIN_BLOCKS)  # the model learned since
    engine.close(long, 0.8, prompt_tokens=1000, output_tokens=len(long_ticks))
    at_end = engine.provisional(long, 0.8)[0]
    for k in range(9, 11):
        meter.read(STEP_SECONDS * k)
    engine.close(short, 1.0, prompt_tokens=0, output_tokens=len(short_ticks))
    meter.read(1.1)
    assert long.final and short.final
    assert at_end == pytest.approx(long.energy_joules, rel=0.01)


def test_end_figure_counts_an_open_neighbour_as_decoding_at_the_batchs_rate() -> None:
    """A stream's prompt is paid at a price that depends on how much the batch decoded
    beside it. It ends while a non-streamed neighbour still runs: that neighbour's tokens
    are unseen, but it decodes in the same batch, one token per step like the streams.
    Counting its seconds in the batch at the rate the streams show (not as decoding
    nothing) is what the intervals settle to once it reports that rate."""
    engine = _engine(SATURATING)
    group = engine._groups["g"]
    group.pace.load({"prefill_rates": [5000.0] * 25, "token_gaps": [0.02] * 25})  # 50 tokens/s learned
    meter = _Meter(engine, start=-0.2)
    decoding = engine.open("g", -0.2, streaming=True, prompt_tokens_estimate=0)  # in full flow at 0
    prompted = engine.open("g", 0.0, streaming=True, prompt_tokens_estimate=1000)
    blind = engine.open("g", 0.0, streaming=False, prompt_tokens_estimate=0)
    # Tokens between readings (none on a reading's instant): 5 per 0.1 s for each stream.
    ticks = {prompted: _stream_ticks(prompted, 0.21, 0.39), decoding: _stream_ticks(decoding, -0.19, 0.69)}
    at_end = None

    def after_reading(at: float) -> None:
        nonlocal at_end
        if math.isclose(at, 0.4):
            engine.close(prompted, 0.4, prompt_tokens=1000, output_tokens=len(ticks[prompted]))
            at_end = engine.provisional(prompted, 0.4)[0]
        if math.isclose(at, 0.6):
            engine.close(blind, 0.6, prompt_tokens=0, output_tokens=30)  # 50 tokens/s, as the streams

    _play(meter, ticks, [STEP_SECONDS * k for k in range(-1, 8)], after_reading)
    engine.close(decoding, 0.7, prompt_tokens=0, output_tokens=len(ticks[decoding]))
    meter.read(0.8)
    assert prompted.final and decoding.final and blind.final
    assert at_end == pytest.approx(prompted.energy_joules, rel=0.01)


def test_end_figure_of_a_non_streamed_request_holds_all_of_its_prompt() -> None:
    """A non-streamed request's prompt is placed by the group's prefill progress, which
    here lags (the default pace, 5,000 tokens/s, for a 20,000-token prompt done in under
    a second). It ends after 10 output tokens: its prefill was done before then, so the
    end figure holds all of its prompt, as its receipt will."""
    engine = AttributionEngine({"g": ["0"]}, idle_power_watts=IDLE_WATTS, prefill_weight=0.2)
    meter = _Meter(engine)
    stream = engine.open("g", 0.0, streaming=True, prompt_tokens_estimate=10)
    blind = engine.open("g", 0.0, streaming=False, prompt_tokens_estimate=20000)
    ticks = _stream_ticks(stream, 0.02, 1.4)
    at_end = None

    def after_reading(at: float) -> None:
        nonlocal at_end
        if math.isclose(at, 0.9):
            engine.close(blind, 0.9, prompt_tokens=20000, output_tokens=10)
            at_end = engine.provisional(blind, 0.9)[0]

    _play(meter, {stream: ticks}, [STEP_SECONDS * k for k in range(1, 15)], after_reading)
    engine.close(stream, 1.4, prompt_tokens=10, output_tokens=len(ticks))
    meter.read(1.5)
    assert blind.final and stream.final and at_end is not None
    assert at_end == pytest.approx(blind.energy_joules, rel=0.01)
