"""The attribution convention of DESIGN.md section 5, checked on hand-made and random schedules."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.attribution import AttributionEngine
from proxy.attribution.split import presence_shares
from proxy.meters.base import EnergySample


class Counter:
    """Feeds an engine cumulative joules from a piecewise-constant power."""

    def __init__(self, engine: AttributionEngine, devices: tuple[str, ...] = ("0",)) -> None:
        self.engine = engine
        self.devices = devices
        self.joules = 0.0
        self.t = 0.0
        engine.on_sample(EnergySample(0.0, {d: 0.0 for d in devices}))

    def advance(self, t: float, watts: float) -> None:
        self.joules += watts * (t - self.t)
        self.t = t
        self.engine.on_sample(EnergySample(t, {d: self.joules / len(self.devices) for d in self.devices}))


def test_single_request_gets_all_but_idle() -> None:
    engine = AttributionEngine({"g": ["0"]}, idle_power_watts=100.0, prefill_weight=0.1)
    meter = Counter(engine)
    meter.advance(1.0, 100.0)  # idle second
    usage = engine.open("g", 1.0, streaming=False)
    meter.advance(2.0, 400.0)
    engine.close(usage, 2.0, prompt_tokens=10, output_tokens=20)
    meter.advance(3.0, 100.0)  # idle again
    totals = engine.totals()["g"]
    assert usage.final
    assert math.isclose(usage.energy_joules, 400.0)
    assert math.isclose(totals.idle_joules, 200.0)
    assert math.isclose(totals.measured_joules, 600.0)


def test_static_by_presence_dynamic_by_work() -> None:
    engine = AttributionEngine({"g": ["0"]}, idle_power_watts=100.0, prefill_weight=0.0)
    meter = Counter(engine)
    a = engine.open("g", 0.0, streaming=True)
    b = engine.open("g", 0.0, streaming=True)
    a.tick(30, 0.5)
    b.tick(10, 0.5)
    meter.advance(1.0, 500.0)  # 100 W static, 400 W dynamic
    engine.close(a, 1.0, prompt_tokens=0, output_tokens=30)
    engine.close(b, 1.0, prompt_tokens=0, output_tokens=10)
    meter.advance(1.1, 100.0)
    assert a.final and b.final
    assert math.isclose(a.static_joules, 50.0) and math.isclose(b.static_joules, 50.0)
    assert math.isclose(a.energy_joules, 50.0 + 300.0)
    assert math.isclose(b.energy_joules, 50.0 + 100.0)


def test_idle_energy_is_never_given_to_a_later_request() -> None:
    engine = AttributionEngine({"g": ["0"]}, idle_power_watts=80.0)
    meter = Counter(engine)
    meter.advance(10.0, 80.0)  # ten idle seconds: 800 J of idle
    usage = engine.open("g", 10.0, streaming=False)
    meter.advance(10.5, 300.0)
    engine.close(usage, 10.5, prompt_tokens=5, output_tokens=5)
    meter.advance(10.6, 80.0)
    assert math.isclose(usage.energy_joules, 150.0)
    assert math.isclose(engine.totals()["g"].idle_joules, 800.0 + 8.0)


def test_long_request_keeps_others_provisional_until_it_ends() -> None:
    engine = AttributionEngine({"g": ["0"]}, idle_power_watts=50.0)
    meter = Counter(engine)
    long = engine.open("g", 0.0, streaming=False)
    short = engine.open("g", 0.0, streaming=False)
    meter.advance(0.5, 250.0)
    engine.close(short, 0.5, prompt_tokens=1, output_tokens=10)
    meter.advance(1.0, 250.0)
    assert not short.final  # its interval also held `long`, whose work is unknown
    estimate = short.energy_joules
    assert estimate > 0
    engine.close(long, 1.0, prompt_tokens=1, output_tokens=30)
    meter.advance(1.1, 50.0)
    assert short.final and long.final
    assert math.isclose(short.energy_joules + long.energy_joules + engine.totals()["g"].idle_joules, engine.totals()["g"].measured_joules)


def test_presence_shares_split_each_instant_equally() -> None:
    shares, idle = presence_shares([(0.0, 1.0), (0.5, 1.0)], 0.0, 2.0)
    assert math.isclose(shares[0], 0.5 + 0.25) and math.isclose(shares[1], 0.25)
    assert math.isclose(idle, 1.0)


def test_learned_idle_power_is_a_low_percentile_of_idle_intervals() -> None:
    engine = AttributionEngine({"g": ["0"]})
    meter = Counter(engine)
    for i in range(1, 40):
        meter.advance(i * 0.1, 70.0 + (i % 3))
    assert 69.9 < (engine.idle_power_watts("g") or 0) < 71.1


requests = st.lists(
    st.tuples(
        st.floats(0.0, 9.0),  # open
        st.floats(0.01, 5.0),  # duration
        st.booleans(),  # streaming
        st.integers(0, 2000),  # prompt tokens
        st.integers(0, 500),  # output tokens
        st.sampled_from(["a", "b"]),  # group
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(
    schedule=requests,
    powers=st.lists(st.floats(0.0, 1500.0), min_size=5, max_size=5),
    idle=st.one_of(st.none(), st.floats(0.0, 400.0)),
    period=st.sampled_from([0.05, 0.1, 0.37]),
)
def test_conservation_on_random_schedules(schedule, powers, idle, period) -> None:
    """request energy + idle energy = measured energy, for every group, within 0.1%."""
    engine = AttributionEngine({"a": ["0"], "b": ["1", "2"]}, idle_power_watts=idle)
    meter = Counter(engine, devices=("0", "1", "2"))
    events: list[tuple[float, int, int]] = []  # (time, kind 0=open 1=tick 2=close, index)
    for i, (start, duration, streaming, _, output, _) in enumerate(schedule):
        events.append((start, 0, i))
        if streaming:
            for k in range(1, 4):
                events.append((start + duration * k / 4, 1, i))
        events.append((start + duration, 2, i))
    events.sort()
    usages: dict[int, object] = {}
    # Both groups see the same meter, so sample both device sets; power changes each second.
    next_sample = period
    for t, kind, i in events:
        while next_sample < t:
            meter.advance(next_sample, powers[int(next_sample) % 5])
            next_sample += period
        start, duration, streaming, prompt, output, group = schedule[i]
        if kind == 0:
            usages[i] = engine.open(group, t, streaming=streaming, prompt_tokens_estimate=prompt // 2)
        elif kind == 1:
            usages[i].tick(max(1, output // 4), t)  # type: ignore[attr-defined]
        else:
            engine.close(usages[i], t, prompt_tokens=prompt, output_tokens=output)  # type: ignore[arg-type]
    end = max((s + d for s, d, *_ in schedule), default=0.0)
    while next_sample <= end + period:
        meter.advance(next_sample, powers[int(next_sample) % 5])
        next_sample += period
    for usage in usages.values():
        assert usage.final  # type: ignore[attr-defined]
    for name, totals in engine.totals().items():
        attributed = sum(u.energy_joules for u in usages.values() if u.group == name)  # type: ignore[attr-defined]
        measured = totals.measured_joules
        assert abs(attributed + totals.idle_joules - measured) <= 1e-3 * max(measured, 1e-9) + 1e-9
        assert math.isclose(attributed, totals.attributed_joules, rel_tol=1e-6, abs_tol=1e-6)
