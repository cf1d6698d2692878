"""SimMeter: the SimGpu read through the Meter interface."""

from __future__ import annotations

import pytest

from proxy.meters.base import EnergySample
from proxy.meters.sim import SimMeter
from proxy.sim import SimGpu, VirtualClock


async def test_sim_meter_reads_the_counter() -> None:
    clock = VirtualClock(5.0)
    gpu = SimGpu(["0", "1"], idle_power_watts=50.0, clock=clock, refresh_seconds=0.1, counter_offset_joules=1e6)
    meter = SimMeter(gpu)
    assert (meter.kind, meter.method) == ("sim", "measured")
    assert list(meter.device_ids()) == ["0", "1"]
    await meter.start()
    first = await meter.read()
    clock.advance(1.05)
    gpu.update_decode_batch(joined=["r"])
    second = await meter.read()
    await meter.close()
    assert isinstance(second, EnergySample)
    assert second.timestamp_seconds == pytest.approx(6.0)  # last refresh, not now
    delta = second.joules_by_device["0"] - first.joules_by_device["0"]
    assert delta == pytest.approx(50.0 * 1.0)
    assert second.power_watts_by_device["1"] > 50.0
