"""Test doubles shared by the proxy tests: a controllable meter and a local upstream."""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from proxy.carbon.intensity import ConstantIntensity
from proxy.config import config_from_dict
from proxy.meters.base import EnergySample
from proxy.receipts.model import MemoryReceiptStore
from proxy.serve import Service


class FakeMeter:
    """A GPU drawing constant power: cumulative joules = watts x elapsed seconds."""

    kind = "fake"
    method = "measured"

    def __init__(self, watts: float = 300.0, devices: tuple[str, ...] = ("0",)) -> None:
        self.watts = watts
        self.devices = devices
        self._start = time.monotonic()
        self.fail: Exception | None = None
        self.reads = 0

    def device_ids(self) -> list[str]:
        return list(self.devices)

    async def start(self) -> None:
        return None

    async def read(self) -> EnergySample:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        now = time.monotonic()
        joules = (now - self._start) * self.watts / len(self.devices)
        return EnergySample(now, {d: joules for d in self.devices})

    async def close(self) -> None:
        return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def start_upstream(routes: dict[str, Handler]) -> tuple[web.AppRunner, str]:
    app = web.Application(client_max_size=1024**3)
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def proxy_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    upstream = {"name": "sim", "url": upstream_url, "dialect": overrides.pop("dialect", "openai")}
    upstream.update(overrides.pop("upstream", {}))
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", **overrides.pop("server", {})},
        "upstreams": [upstream],
        "carbon": {"intensity": 450, "pue": 1.2},
        "attribution": {"idle_power_watts": 60},
        "receipts": {"path": ":memory:"},
    }
    data.update(overrides)
    return data


async def start_proxy(upstream_url: str, meter: Any = None, **overrides: Any) -> Service:
    service = Service(
        config_from_dict(proxy_config(upstream_url, **overrides)),
        meter=meter or FakeMeter(),
        intensity=ConstantIntensity(450),
        receipts=MemoryReceiptStore(),
    )
    await service.start()
    return service
