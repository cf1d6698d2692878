"""The worked example users know, through the per-request path:
10 h x 4 GPUs x 0.3 kW, PUE 1.5, 450 g/kWh -> 12 kWh, 18 kWh, 8.1 kg CO2e."""

from __future__ import annotations

import pytest

from proxy.accounting import JOULES_PER_KWH, Accountant, GroupPricing
from proxy.attribution import AttributionEngine
from proxy.carbon.intensity import ConstantIntensity
from proxy.meters.base import EnergySample


def test_ten_hours_on_four_gpus_through_attribution_and_accounting() -> None:
    devices = ["0", "1", "2", "3"]
    accountant = Accountant(
        lambda weight_at, on_final: AttributionEngine({"g": devices}, idle_power_watts=100.0, weight_at=weight_at, on_final=on_final),
        ConstantIntensity(450.0),
        {"g": GroupPricing(pue=1.5, embodied_g_per_device_second=0.0, devices=4)},
        lambda: "meter=test",
    )
    engine = accountant.engine
    hours = 10.0
    start = 1000.0
    engine.on_sample(EnergySample(start, {d: 0.0 for d in devices}))
    usage = engine.open("g", start, streaming=False)
    # One long batch job keeps the four GPUs at 300 W each for ten hours.
    for step in range(1, 601):
        t = start + step * hours * 3600 / 600
        engine.on_sample(EnergySample(t, {d: 300.0 * (t - start) for d in devices}))
    end = start + hours * 3600
    engine.close(usage, end, prompt_tokens=1000, output_tokens=100000)
    engine.on_sample(EnergySample(end + 1, {d: 300.0 * hours * 3600 + 100 for d in devices}))
    assert usage.final
    figures = accountant.figures(usage, end)
    assert figures.energy_joules / JOULES_PER_KWH == pytest.approx(12.0)
    assert figures.energy_joules * figures.pue / JOULES_PER_KWH == pytest.approx(18.0)
    assert figures.operational_grams / 1000 == pytest.approx(8.1)
    assert figures.co2e_grams == pytest.approx(figures.operational_grams)  # embodied off here
    assert "pue=1.5" in figures.basis and "status=final" in figures.basis
