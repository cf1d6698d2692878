"""[attribution] settle_ms: a response's last bytes wait (bounded) for the meter reading
that covers its end, and then carry a measured figure instead of a predicted tail."""

from __future__ import annotations

import asyncio
from typing import Callable

from proxy.accounting import Accountant, GroupPricing
from proxy.attribution import AttributionEngine, RequestUsage
from proxy.carbon.intensity import ConstantIntensity
from proxy.meters.base import EnergySample


def _accountant(settle_seconds: float) -> Accountant:
    def factory(weight_at: Callable[[float], float], on_final: Callable[[RequestUsage], None]) -> AttributionEngine:
        return AttributionEngine({"g": ["0"]}, idle_power_watts=50.0, weight_at=weight_at, on_final=on_final)

    pricing = {"g": GroupPricing(pue=1.2, embodied_g_per_device_second=0.0, devices=1)}
    return Accountant(factory, ConstantIntensity(400.0), pricing, lambda: "meter=sim", settle_seconds=settle_seconds)


def test_the_figure_waits_for_the_reading_that_covers_the_end() -> None:
    async def scenario() -> tuple[bool, bool, float, float]:
        accountant = _accountant(settle_seconds=60.0)
        engine = accountant.engine
        engine.on_sample(EnergySample(0.0, {"0": 0.0}))
        usage = engine.open("g", 0.0, streaming=False, prompt_tokens_estimate=100)
        engine.on_sample(EnergySample(1.0, {"0": 150.0}))  # 50 W idle + 100 W of work
        engine.close(usage, 1.5, prompt_tokens=100, output_tokens=20)
        predicted = accountant.figures(usage, 1.5).energy_joules
        waiting = asyncio.ensure_future(accountant.covered(usage))
        await asyncio.sleep(0)
        held = not waiting.done()  # no reading after its end yet: the bytes are held
        engine.on_sample(EnergySample(2.0, {"0": 300.0}))
        accountant.sampled()
        await asyncio.wait_for(waiting, 5.0)
        figures = accountant.figures(usage, 2.0)
        return held, figures.final, predicted, figures.energy_joules

    held, final, predicted, measured = asyncio.run(scenario())
    assert held
    # Covered by a reading, no prediction left: alone from 0 to 1.5 s, it has the first
    # interval's 150 J, and of the second's 150 J all the dynamic 100 J and the static
    # 50 W for its half second (the other half second is idle energy).
    assert final
    assert measured == 150.0 + 100.0 + 0.5 * 50.0
    assert predicted != measured


def test_without_settle_ms_or_a_meter_nothing_waits() -> None:
    async def scenario(settle_seconds: float) -> bool:
        accountant = _accountant(settle_seconds)
        engine = accountant.engine
        engine.on_sample(EnergySample(0.0, {"0": 0.0}))
        usage = engine.open("g", 0.0, streaming=True)
        engine.close(usage, 0.5, prompt_tokens=10, output_tokens=10)
        await asyncio.wait_for(accountant.covered(usage), 5.0)  # returns: never held past settle_ms
        return usage.final

    assert asyncio.run(scenario(0.0)) is False
    assert asyncio.run(scenario(0.01)) is False  # no reading came within 10 ms: sent as predicted
