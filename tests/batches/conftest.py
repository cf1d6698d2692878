"""A sim model server and a proxy whose grid and clock the test scripts."""

from __future__ import annotations

import asyncio
import hashlib
import io
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import openai
import orjson
import pytest
from helpers import proxy_config

from proxy.batches.clock import ManualClock
from proxy.batches.fake_forecast import ScriptedGrid
from proxy.build import build_receipts
from proxy.config import config_from_dict
from proxy.meters.sim import SimMeter
from proxy.receipts.model import MemoryReceiptStore
from proxy.serve import Service
from proxy.sim.config import SimModelConfig
from proxy.sim.gpu import SimGpu
from proxy.sim.server import SimServer, run_sim_server

HOUR = 3600.0
T0 = 1_800_000_000.0
"""The scripted day: dirty now, dirtier at +3 h, clean from +6 h to +9 h, then middling."""
TRACE = [(T0, 400.0), (T0 + 3 * HOUR, 500.0), (T0 + 6 * HOUR, 100.0), (T0 + 9 * HOUR, 450.0)]
OWNER_KEY = "sk-owner"
OWNER_HASH = hashlib.sha256(OWNER_KEY.encode()).hexdigest()


@dataclass
class Rig:
    sim: SimServer
    gpu: SimGpu
    clock: ManualClock
    grid: ScriptedGrid
    services: list[Service]
    start: Callable[..., Awaitable[Service]]

    @property
    def service(self) -> Service:
        return self.services[-1]

    clients: dict[tuple[str, str], openai.AsyncOpenAI] = field(default_factory=dict)

    def client(self, key: str = OWNER_KEY) -> openai.AsyncOpenAI:
        return self._client(f"http://127.0.0.1:{self.service.public_port}/v1", key)

    def direct(self) -> openai.AsyncOpenAI:
        return self._client(f"{self.sim.url}/v1", "x")

    def _client(self, url: str, key: str) -> openai.AsyncOpenAI:
        if (url, key) not in self.clients:
            self.clients[(url, key)] = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
        return self.clients[(url, key)]


@pytest.fixture
async def rig(tmp_path: Any) -> AsyncIterator[Rig]:
    gpu = SimGpu(("0",), refresh_seconds=0.05)
    sim = await run_sim_server("127.0.0.1", 0, SimModelConfig(tokens_per_second=2000), gpu)
    clock = ManualClock(T0)
    grid = ScriptedGrid(clock, TRACE)
    services: list[Service] = []

    async def start(scripted: bool = True, receipts: dict[str, Any] | None = None, **batches: Any) -> Service:
        """`receipts`: a [receipts] table (e.g. the fleet backend), its store built as `serve` does."""
        data = proxy_config(sim.url, batches={"path": str(tmp_path / "batches.db"), **batches})
        if receipts is not None:
            data["receipts"] = receipts
        config = config_from_dict(data)
        store = build_receipts(config) if receipts is not None else MemoryReceiptStore()
        service = Service(config, meter=SimMeter(gpu), intensity=grid, receipts=store)
        if scripted:
            service.batch_clock, service.batch_forecast = clock, grid
        await service.start()
        services.append(service)
        return service

    rig = Rig(sim, gpu, clock, grid, services, start)
    yield rig
    for client in rig.clients.values():
        await client.close()
    for service in services:
        await service.stop()
    await sim.close()


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def chat_lines(count: int, url: str = "/v1/chat/completions", max_tokens: int = 8) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": url,
            "body": {"model": "sim-llm", "messages": [{"role": "user", "content": f"Question number {i}?"}], "max_tokens": max_tokens},
        }
        for i in range(count)
    ]


async def upload(client: openai.AsyncOpenAI, content: bytes) -> Any:
    return await client.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch")


async def until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 30.0) -> None:
    """Poll (a bound, not a timing assertion: the work itself is fast)."""
    for _ in range(int(seconds / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}")


async def checked(client: openai.AsyncOpenAI, batch_id: str) -> Any:
    """The batch once its input file has been checked (validating -> in_progress or failed)."""
    found: list[Any] = []

    async def done() -> bool:
        found[:] = [await client.batches.retrieve(batch_id)]
        return found[0].status != "validating"

    await until(done, "the input file's check")
    return found[0]


# The fleet tests' throwaway PostgreSQL (skips, or fails under CI, exactly where they do).
from fleet.conftest import cluster, dsn  # noqa: E402,F401

