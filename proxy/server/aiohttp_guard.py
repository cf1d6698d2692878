"""The connection limits of proxy.server.connections on aiohttp's low-level server.

aiohttp has a keep-alive timeout but no header-read timeout and no connection cap, so
its per-connection protocol is extended here: a timer armed when the first byte of a
request head arrives and cancelled when the head is parsed, admission by the guard, and
counting of what was closed and why.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.web_protocol import RequestHandler

from proxy.public_errors import JsonErrorRequestHandler, JsonErrorServer
from proxy.server.connections import ConnectionGuard


class GuardedServer(JsonErrorServer):
    def __init__(self, handler: Any, *, guard: ConnectionGuard, header_read_seconds: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.guard = guard
        self.header_read_seconds = header_read_seconds

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)


class GuardedHandler(JsonErrorRequestHandler):
    __slots__ = ("_guard", "_header_seconds", "_header_handle", "_refused")

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager.guard
        self._header_seconds = manager.header_read_seconds
        self._header_handle: asyncio.TimerHandle | None = None
        self._refused = False

    # -- ClientConnection ---------------------------------------------------------------

    def is_idle(self) -> bool:
        return not self._request_in_progress and not self._messages and self._header_handle is None

    def close_idle(self) -> None:
        self.force_close()

    # -- protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.admit(self):
            self._refused = True
            assert isinstance(transport, asyncio.Transport)
            transport.write(self._guard.refusal())
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._guard.release(self)
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._cancel_header_timer()  # a head is complete
        elif self._header_handle is None and not self._force_close:
            # Part of a head: it must be complete in time, however slowly it trickles.
            self._header_handle = self._loop.call_later(self._header_seconds, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None

    def _header_timeout(self) -> None:
        self._header_handle = None
        if not self._messages and not self._request_in_progress and not self._force_close:
            self._guard.count("header_timeout")
            self.force_close()

    def _process_keepalive(self) -> None:
        closing = self._force_close
        super()._process_keepalive()
        if self._force_close and not closing:
            self._guard.count("keepalive_timeout")
