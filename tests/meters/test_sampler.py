"""The sampler keeps the proxy safe from its meter: raise, hang, garbage."""

from __future__ import annotations

import asyncio
import math
import time

from proxy.meters.base import EnergySample
from proxy.meters.sampler import Sampler


class ScriptedMeter:
    kind = "scripted"
    method = "measured"

    def __init__(self) -> None:
        self.mode = "ok"
        self.joules = 100.0

    def device_ids(self) -> list[str]:
        return ["0"]

    async def start(self) -> None:
        return None

    async def read(self) -> EnergySample:
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "raise":
            raise RuntimeError("driver gone")
        if self.mode == "nan":
            return EnergySample(time.monotonic(), {"0": math.nan})
        if self.mode == "backwards":
            return EnergySample(time.monotonic(), {"0": self.joules - 5.0})
        if self.mode == "not-a-sample":
            return {"0": 1.0}  # type: ignore[return-value]
        self.joules += 1.0
        return EnergySample(time.monotonic(), {"0": self.joules})

    async def close(self) -> None:
        return None


async def test_garbage_and_failures_are_reported_not_consumed() -> None:
    meter = ScriptedMeter()
    consumed: list[EnergySample] = []
    sampler = Sampler(meter, consumed.append, 0.01)
    await sampler.sample_once()
    assert sampler.health.ok and len(consumed) == 1
    for mode, message in [("raise", "driver gone"), ("nan", "invalid energy"), ("backwards", "went backwards"), ("not-a-sample", "not an EnergySample")]:
        meter.mode = mode
        await sampler.sample_once()
        assert not sampler.health.ok
        assert message in (sampler.health.last_error or "")
        assert "meter_status=down" in sampler.basis()
    assert len(consumed) == 1  # nothing bad reached attribution
    meter.mode = "ok"
    await sampler.sample_once()
    assert sampler.health.ok and sampler.health.total_failures == 4 and len(consumed) == 2


async def test_a_hanging_meter_times_out_and_the_loop_goes_on() -> None:
    meter = ScriptedMeter()
    sampler = Sampler(meter, lambda s: None, 0.01)
    sampler._read_timeout = 0.05  # the default is 5 periods, at least 1 s
    meter.mode = "hang"
    started = time.monotonic()
    await sampler.sample_once()
    assert time.monotonic() - started < 0.5
    assert sampler.health.last_error == "read timed out"
    assert sampler.health.last_success_monotonic is None and not sampler.health.ok
