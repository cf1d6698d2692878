"""A proxy metering with NVML starts attribution from what NVML says of its GPUs (their
model and enforced power limit), not from the configured device model's default."""

from __future__ import annotations

from typing import Callable

from proxy.carbon.embodied import EmbodiedModel
from proxy.meters.nvml import NvmlMeter
from proxy.sim import SimGpu, SimModelConfig, run_sim_server
from tests.helpers import start_proxy

from .fake_pynvml import FakeClock, FakeGpu, FakeNvml


async def test_nvml_names_and_limits_reach_the_attribution_prior(install_nvml: Callable[..., FakeNvml], clock: FakeClock) -> None:
    install_nvml([FakeGpu(f"GPU-{i}", name="NVIDIA A100-SXM4-80GB", enforced_limit_watts=300.0) for i in range(2)])
    sim = await run_sim_server("127.0.0.1", 0, SimModelConfig(), SimGpu())
    try:
        # No device_model configured: the default (H100) would say 140 W idle, 1400 W board.
        service = await start_proxy(sim.url, meter=NvmlMeter(clock=clock), attribution={"idle_power_watts": "auto"})
        try:
            engine = service.proxy.accountant.engine  # type: ignore[union-attr]
            group = next(iter(engine.group_names))
            assert engine.group_devices(group) == ("0", "1")
            assert engine.idle_power_watts(group) == 2 * 55.0  # A100 idle until idle time is seen
            assert engine._groups[group].model.peak_watts == 2 * (300.0 - 55.0)
            # Embodied carbon follows the same name: an A100's footprint, not the default H100's.
            pricing = service.proxy.accountant._pricing[group]  # type: ignore[union-attr]
            assert pricing.embodied_g_per_device_second == EmbodiedModel("A100").grams_per_device_second
        finally:
            await service.stop()
    finally:
        await sim.close()
