"""A client that leaves stops its generation: slot freed, partial work accounted."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import aiohttp
import pytest

from proxy.sim import SimGpu, SimModelConfig, SimServer, run_sim_server

SLOW = SimModelConfig(tokens_per_second=100.0, natural_tokens_min=500, natural_tokens_max=600,
                      diffusion_seconds_per_step=0.05)


@pytest.fixture
async def slow_server() -> AsyncIterator[SimServer]:
    server = await run_sim_server("127.0.0.1", 0, SLOW, SimGpu())
    try:
        yield server
    finally:
        await server.close()


async def wait_for(condition, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def assert_books_balance(gpu: SimGpu) -> None:
    now = gpu.now()
    accounted = sum(gpu.ground_truth_joules(r, now) for r in gpu.request_ids()) + gpu.idle_joules_at(now)
    assert accounted == pytest.approx(gpu.energy_joules(now), rel=1e-9)


async def test_stream_disconnect_stops_generation(slow_server: SimServer) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "tell me everything"}], "stream": True}
    async with aiohttp.ClientSession(slow_server.url) as session:
        response = await session.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "leaver"})
        for _ in range(4):
            await response.content.readuntil(b"\n\n")
        response.close()  # drop the connection mid-stream
    state = slow_server.state
    await wait_for(lambda: state.stats.cancelled == 1)
    assert state.stats.in_flight == 0 and state.stats.completed == 0
    assert state.scheduler.engine.running_count == 0
    assert 3 <= state.stats.completion_tokens < 50
    assert slow_server.gpu.power_watts() == pytest.approx(70.0)  # back to idle
    truth = slow_server.gpu.ground_truth("leaver")
    assert truth.dynamic_joules > 0 and not slow_server.gpu.is_present("leaver")
    steps_then = state.scheduler.engine.steps
    await asyncio.sleep(0.1)
    assert state.scheduler.engine.steps == steps_then  # nothing left to generate
    assert_books_balance(slow_server.gpu)


async def test_non_streaming_and_diffusion_disconnects_are_noticed(slow_server: SimServer) -> None:
    timeout = aiohttp.ClientTimeout(total=0.2)
    async with aiohttp.ClientSession(slow_server.url, timeout=timeout) as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post("/api/generate", json={"model": "m", "prompt": "long", "stream": False})
        with pytest.raises(asyncio.TimeoutError):
            await session.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 200, "width": 1024, "height": 1024})
    state = slow_server.state
    await wait_for(lambda: state.stats.cancelled == 2)
    assert state.stats.in_flight == 0 and state.diffusion.steps_done < 20
    assert slow_server.gpu.power_watts() == pytest.approx(70.0)
    assert_books_balance(slow_server.gpu)


async def test_shutdown_cancels_open_streams() -> None:
    server = await run_sim_server("127.0.0.1", 0, SLOW, SimGpu())
    session = aiohttp.ClientSession(server.url)
    try:
        response = await session.post("/api/generate", json={"model": "m", "prompt": "go on"})
        await response.content.readline()
        await asyncio.wait_for(server.close(), timeout=5)
        assert server.stats.in_flight == 0 and server.stats.cancelled == 1
    finally:
        await session.close()
