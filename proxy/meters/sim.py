"""The `sim` meter: the SimGpu's energy counter, read as a hardware counter is read."""

from __future__ import annotations

from typing import Sequence

from proxy.meters.base import EnergySample
from proxy.sim.gpu import SimGpu


class SimMeter:
    """Reads a SimGpu in the same process; `measured`, because it plays the hardware.

    The sample's timestamp is when the counter last refreshed (SimGpu.refresh_seconds,
    like NVML's ~100 ms), on the SimGpu's clock (time.monotonic unless a test injects one).
    """

    kind = "sim"
    method = "measured"

    def __init__(self, gpu: SimGpu) -> None:
        self._gpu = gpu

    def device_ids(self) -> Sequence[str]:
        return self._gpu.device_ids

    async def start(self) -> None:
        return None

    async def read(self) -> EnergySample:
        timestamp_seconds, joules_by_device = self._gpu.counter_sample()
        return EnergySample(
            timestamp_seconds=timestamp_seconds,
            joules_by_device=joules_by_device,
            power_watts_by_device=self._gpu.power_watts_by_device(),
        )

    async def close(self) -> None:
        return None
