"""The public listener on the lean HTTP/1.1 protocol: bind, and stop with a drain."""

from __future__ import annotations

import asyncio
import socket

from proxy.server.connections import ConnectionGuard
from proxy.server.protocol import Handler, HttpProtocol, Limits


class PublicServer:
    def __init__(self, handler: Handler, *, guard: ConnectionGuard, limits: Limits) -> None:
        self._handler = handler
        self._guard = guard
        self._limits = limits
        self._server: asyncio.Server | None = None
        self.connections: set[HttpProtocol] = set()
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpProtocol(self._handler, self._guard, self._limits, self.connections),
            host,
            port,
            backlog=4096,
            reuse_address=True,
        )
        for sock in self._server.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self.port = sock.getsockname()[1]
                break
        return self.port

    async def stop(self, drain_seconds: float) -> None:
        """Refuse new connections at once; let requests in flight finish for up to
        `drain_seconds`; then cancel what is left (their connections are cut)."""
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            connection.close_when_done()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_seconds
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        tasks = [c.cancel() for c in list(self.connections)]
        pending = [t for t in tasks if t is not None]
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        for connection in list(self.connections):
            connection.abort()
        await asyncio.sleep(0)
        self._server = None
