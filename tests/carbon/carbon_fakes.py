"""A scriptable local HTTP server standing in for the intensity APIs (no network in tests)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.carbon.providers import PollingProvider

EM_TOKEN = "em-secret-token-9f8e7d"
WT_USER, WT_PASS, WT_TOKEN = "wt-user-secret", "wt-pass-secret-77", "wt-bearer-secret-55"
FAST = {"poll_seconds": 0.05, "timeout_seconds": 0.3, "startup_wait_seconds": 1.0, "retry_seconds": 0.05}


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    text: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0
    hang: bool = False


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    unix: float


class FakeApi:
    """Each path answers from its own script; the last reply repeats."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[Reply]] = {}
        self.seen: list[Seen] = []
        self.server: TestServer | None = None
        self.release = asyncio.Event()

    def script(self, path: str, *replies: Reply) -> None:
        self.scripts[path] = list(replies)

    def hits(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.path, dict(request.query), dict(request.headers), time.time()))
        script = self.scripts.get(request.path)
        if not script:
            return web.Response(status=404, text="no script for this path")
        reply = script.pop(0) if len(script) > 1 else script[0]
        if reply.hang:
            await self.release.wait()
        if reply.delay_seconds:
            await asyncio.sleep(reply.delay_seconds)
        body = reply.text if reply.text is not None else orjson.dumps(reply.json).decode()
        return web.Response(status=reply.status, text=body, headers=reply.headers, content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def close(self) -> None:
        self.release.set()
        if self.server is not None:
            await self.server.close()


class FakeClock:
    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.asynccontextmanager
async def running(provider: PollingProvider) -> AsyncIterator[PollingProvider]:
    await provider.start()
    try:
        yield provider
    finally:
        await provider.close()
