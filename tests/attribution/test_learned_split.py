"""The engine once it has learned a group's costs: prompts paid their price, decode shared
by the batch, prefill placed by progress; and still request + idle = measured."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.attribution import AttributionEngine
from proxy.attribution.costmodel import MIN_BLOCKS, Fit
from proxy.attribution.usage import RequestUsage
from proxy.meters.base import EnergySample

PROMPT_JOULES_PER_TOKEN = 0.1
# Separable: 0.1 J per prompt token (100 W per 1000 tokens/s), decode 50 W x sqrt(batch).
COSTS = Fit(theta=(100.0, 0.0, 0.0, 50.0, 0.0, 0.0), saturation_watts=math.inf)


def learned_engine(groups: dict[str, list[str]], idle: float | None = 50.0) -> AttributionEngine:
    engine = AttributionEngine(groups, idle_power_watts=idle)
    for name in groups:
        engine._groups[name].model.set_prior(COSTS, MIN_BLOCKS)  # as if fitted: the learned path
    return engine


def sample(engine: AttributionEngine, t: float, joules: float, devices: tuple[str, ...] = ("0",)) -> None:
    engine.on_sample(EnergySample(t, {d: joules / len(devices) for d in devices}))


def _two_streams_then_a_prompt(engine: AttributionEngine) -> tuple[RequestUsage, RequestUsage, RequestUsage]:
    """a and b decode from 0; c, with 1000 prompt tokens, arrives at 0.1 (nothing drawn
    until then); a and b each make 5 tokens by 0.15."""
    sample(engine, 0.0, 0.0)
    a = engine.open("g", 0.0, streaming=True, prompt_tokens_estimate=0)
    b = engine.open("g", 0.0, streaming=True, prompt_tokens_estimate=0)
    a.tick(1, 0.01)
    b.tick(1, 0.01)
    sample(engine, 0.1, 0.0)
    c = engine.open("g", 0.1, streaming=True, prompt_tokens_estimate=1000)
    a.tick(5, 0.15)
    b.tick(5, 0.15)
    return a, b, c


def test_prompt_paid_its_price_and_the_batch_shares_the_rest() -> None:
    engine = learned_engine({"g": ["0"]})
    a, b, c = _two_streams_then_a_prompt(engine)
    sample(engine, 0.2, 5.0 + 100.0 + 10.0)  # 5 J idle (50 W), 100 J for c's prompt, 10 J decode
    c.tick(1, 0.2)
    for usage in (a, b, c):
        engine.close(usage, 0.2, prompt_tokens=1000 if usage is c else 0, output_tokens=6)
    sample(engine, 0.3, 115.0 + 5.0)
    assert a.final and b.final and c.final
    # c's 1000 prompt tokens (placed in its time to first token, [0.1, 0.2]) cost 0.1 J
    # each; the 10 J left is decode, shared by a and b's tokens.
    dynamic = [u.dynamic_joules_final for u in (a, b, c)]
    assert all(math.isclose(x, y) for x, y in zip(dynamic, [5.0, 5.0, 100.0]))
    totals = engine.totals()["g"]
    assert math.isclose(sum(u.energy_joules for u in (a, b, c)) + totals.idle_joules, totals.measured_joules)


def test_a_prompts_price_that_its_interval_could_not_pay_is_paid_by_the_next() -> None:
    # c's 1000 prompt tokens (100 J at 0.1 J each) ran in [0.1, 0.2], but the counter's
    # read there was stamped early: 40 J of them came with the next reading. Paid only
    # what its interval drew, c lost 40 J to a and b's decoding in the next one.
    engine = learned_engine({"g": ["0"]})
    a, b, c = _two_streams_then_a_prompt(engine)
    sample(engine, 0.2, 5.0 + 60.0)  # idle, and 60 J of c's prompt
    c.tick(1, 0.2)
    a.tick(5, 0.25)
    b.tick(5, 0.25)
    sample(engine, 0.3, 65.0 + 5.0 + 40.0 + 9.0)  # idle, the prompt's other 40 J, 9 J of decoding
    for usage in (a, b, c):
        engine.close(usage, 0.3, prompt_tokens=1000 if usage is c else 0, output_tokens=1 if usage is c else 11)
    sample(engine, 0.4, 119.0 + 5.0)
    assert a.final and b.final and c.final
    # The three decoded side by side for 0.1 s: 3 J each of the 9 J.
    assert [u.dynamic_joules_final for u in (a, b, c)] == pytest.approx([3.0, 3.0, 100.0 + 3.0])
    assert c.prompt_debt_joules == 0.0
    totals = engine.totals()["g"]
    assert math.isclose(sum(u.energy_joules for u in (a, b, c)) + totals.idle_joules, totals.measured_joules)


def test_non_streamed_decoders_share_decode_by_time_with_streams() -> None:
    engine = learned_engine({"g": ["0"]})
    sample(engine, 0.0, 0.0)
    streamed = engine.open("g", 0.0, streaming=True, prompt_tokens_estimate=0)
    blind = engine.open("g", 0.0, streaming=False, prompt_tokens_estimate=0)
    streamed.tick(1, 0.0)
    joules = 0.0
    for k in range(1, 11):
        if k % 3 == 0:
            streamed.tick(2, k / 10)  # lumps: a step outlasting an interval
        joules += 10.0
        sample(engine, k / 10, joules)
    engine.close(streamed, 1.0, prompt_tokens=0, output_tokens=7)
    engine.close(blind, 1.0, prompt_tokens=0, output_tokens=7)
    sample(engine, 1.1, joules)
    # Both decoded the whole second in the same batch: the same energy, lumps or not.
    assert math.isclose(streamed.energy_joules, blind.energy_joules, rel_tol=1e-9)


requests = st.lists(
    st.tuples(
        st.floats(0.0, 9.0),  # open
        st.floats(0.01, 5.0),  # duration
        st.booleans(),  # streaming
        st.integers(0, 4000),  # prompt tokens
        st.integers(0, 500),  # output tokens
        st.sampled_from(["a", "b"]),  # group
    ),
    max_size=25,
)


@settings(max_examples=100, deadline=None)
@given(
    schedule=requests,
    powers=st.lists(st.floats(0.0, 1500.0), min_size=5, max_size=5),
    idle=st.one_of(st.none(), st.floats(0.0, 400.0)),
    period=st.sampled_from([0.05, 0.1, 0.37]),
)
def test_conservation_with_learned_costs(schedule, powers, idle, period) -> None:
    """request energy + idle energy = measured energy, with every learned path in play."""
    engine = learned_engine({"a": ["0"], "b": ["1", "2"]}, idle)
    devices = ("0", "1", "2")
    joules = 0.0
    last = 0.0
    sample(engine, 0.0, 0.0, devices)
    events: list[tuple[float, int, int]] = []
    for i, (start, duration, streaming, _, _, _) in enumerate(schedule):
        events.append((start, 0, i))
        if streaming:
            events += [(start + duration * k / 4, 1, i) for k in range(1, 4)]
        events.append((start + duration, 2, i))
    events.sort()
    usages: dict[int, object] = {}
    next_sample = period
    end = max((s + d for s, d, *_ in schedule), default=0.0)
    for t, kind, i in [*events, (end + 2 * period, 3, -1)]:
        while next_sample < t:
            joules += powers[int(next_sample) % 5] * (next_sample - last)
            last = next_sample
            sample(engine, next_sample, joules, devices)
            next_sample += period
        if kind == 3:
            break
        _, _, streaming, prompt, output, group = schedule[i]
        if kind == 0:
            usages[i] = engine.open(group, t, streaming=streaming, prompt_tokens_estimate=prompt)
        elif kind == 1:
            usages[i].tick(max(1, output // 4), t)  # type: ignore[attr-defined]
        else:
            engine.close(usages[i], t, prompt_tokens=prompt, output_tokens=output)  # type: ignore[arg-type]
    for usage in usages.values():
        assert usage.final  # type: ignore[attr-defined]
    for name, totals in engine.totals().items():
        attributed = math.fsum(u.energy_joules for u in usages.values() if u.group == name)  # type: ignore[attr-defined]
        measured = totals.measured_joules
        assert abs(attributed + totals.idle_joules - measured) <= 1e-6 * max(measured, 1e-9) + 1e-9
        assert all(u.energy_joules >= -1e-9 for u in usages.values())  # type: ignore[attr-defined]


def test_images_split_by_work_units_and_embeddings_do_not_decode() -> None:
    engine = learned_engine({"g": ["0"]})
    sample(engine, 0.0, 0.0)
    small = engine.open("g", 0.0, streaming=False)
    large = engine.open("g", 0.0, streaming=False)
    embedding = engine.open("g", 0.0, streaming=False, prompt_tokens_estimate=100)
    chat = engine.open("g", 0.0, streaming=False, prompt_tokens_estimate=0)
    sample(engine, 1.0, 1000.0)
    engine.close(small, 1.0, prompt_tokens=None, output_tokens=None, work_units=1.0)
    engine.close(large, 1.0, prompt_tokens=None, output_tokens=None, work_units=4.0)
    engine.close(embedding, 1.0, prompt_tokens=100, output_tokens=0)
    engine.close(chat, 1.0, prompt_tokens=0, output_tokens=50)
    sample(engine, 1.1, 1000.0)
    assert all(u.final for u in (small, large, embedding, chat))
    # Images by their work units; the embedding pays its prompt only.
    assert math.isclose(large.dynamic_joules_final, 4 * small.dynamic_joules_final)
    assert math.isclose(embedding.dynamic_joules_final, 100 * PROMPT_JOULES_PER_TOKEN)


def test_costs_are_not_learned_from_power_before_idle_power_is_known() -> None:
    # Traffic from the first reading: no idle stretch yet, so idle power is a stand-in
    # (the lowest recent power; a stale read makes it 0 W) and every interval's energy
    # would enter the cost fit as dynamic. Once a few idle seconds are seen, it learns.
    engine = AttributionEngine({"g": ["0"]})
    model = engine._groups["g"].model
    joules, t = 0.0, 0.0
    sample(engine, t, joules)
    for i in range(40):  # 40 requests of 2 s back to back: 80 s busy at 300 W
        usage = engine.open("g", t, streaming=True, prompt_tokens_estimate=100)
        for _ in range(20):
            t += 0.1
            usage.tick(4, t)
            joules += 0.0 if i % 7 == 0 else 30.0  # some stale reads
            sample(engine, t, joules)
        engine.close(usage, t, prompt_tokens=100, output_tokens=80)
    assert model.blocks == 0 and not engine.costs_learned("g")
    for _ in range(40):  # 4 s idle at 70 W
        t += 0.1
        joules += 7.0
        sample(engine, t, joules)
    for _ in range(100):  # 10 s busy: now the fit learns
        usage = engine.open("g", t, streaming=True, prompt_tokens_estimate=100)
        t += 0.1
        usage.tick(4, t)
        joules += 30.0
        engine.close(usage, t, prompt_tokens=100, output_tokens=4)
        sample(engine, t + 1e-6, joules)
    assert model.blocks > 0
