"""A sim server on 127.0.0.1 with a random port, fast enough for a quick suite."""

from __future__ import annotations

from typing import AsyncIterator

import pytest

from proxy.sim import SimGpu, SimModelConfig, SimServer, run_sim_server

FAST_CONFIG = SimModelConfig(
    model="sim-test",
    tokens_per_second=400.0,
    prefill_seconds_per_token=0.00005,
    natural_tokens_min=8,
    natural_tokens_max=24,
    diffusion_seconds_per_step=0.02,
    diffusion_default_steps=4,
)


@pytest.fixture
async def sim_server() -> AsyncIterator[SimServer]:
    server = await run_sim_server("127.0.0.1", 0, FAST_CONFIG, SimGpu(["0", "1"]))
    try:
        yield server
    finally:
        await server.close()
