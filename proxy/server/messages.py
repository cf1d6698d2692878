"""What a handler of the public listener sees: a request (head parsed, body streamed) and
the ways to answer it. Server-agnostic on purpose: proxy.app and proxy.forward use only
this, so the HTTP/1.1 machinery (proxy.server.protocol) stays swappable."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Iterable, Mapping
from urllib.parse import parse_qsl, unquote

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

if TYPE_CHECKING:
    from proxy.server.protocol import HttpProtocol

BODY_HIGH_WATER_BYTES = 256 * 1024
"""Request body buffered beyond this pauses reading from the client (backpressure)."""


@dataclass(slots=True)
class Reply:
    """A complete response: the server frames it with Content-Length."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = field(default_factory=dict)
    reason: str | None = None


class BodyTooLarge(Exception):
    pass


class RequestBody:
    """The request body as it arrives: iterate it, or take it whole once complete."""

    __slots__ = ("_parts", "_size", "_eof", "_error", "_waiter", "_protocol", "_paused", "received", "continue_sent", "_expect")

    def __init__(self, protocol: "HttpProtocol", expect_continue: bool) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._protocol = protocol
        self._paused = False
        self.received = 0
        self._expect = expect_continue
        self.continue_sent = False

    # -- fed by the protocol ------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        self.received += len(data)
        if self._size > BODY_HIGH_WATER_BYTES and not self._paused:
            self._paused = True
            self._protocol.pause_body()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self._eof:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the handler ------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """All of it has arrived (nothing left to wait for)."""
        return self._eof

    def read_nowait(self) -> bytes:
        data = b"".join(self._parts) if len(self._parts) != 1 else self._parts[0]
        self._parts = []
        self._size = 0
        self._resume()
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; BodyTooLarge past `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self:
            size += len(chunk)
            if limit is not None and size > limit:
                raise BodyTooLarge()
            parts.append(chunk)
        return b"".join(parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            if self._parts:
                yield self.read_nowait()
                continue
            if self._error is not None:
                raise self._error
            if self._eof:
                return
            if self._expect and not self.continue_sent:
                self.continue_sent = True
                self._protocol.send_continue()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self._protocol.resume_body()


class Request:
    """One request on the public listener, with the means to answer it."""

    __slots__ = ("method", "raw_path", "path", "query_string", "headers", "http11", "keep_alive", "content_length", "body",
                 "client_ip", "scheme", "_protocol", "_query", "started", "finished")  # fmt: skip

    def __init__(
        self,
        protocol: "HttpProtocol",
        method: str,
        raw_path: str,
        headers: CIMultiDictProxy[str],
        http11: bool,
        keep_alive: bool,
        content_length: int | None,
        body: RequestBody | None,
        client_ip: str | None,
    ) -> None:
        self._protocol = protocol
        self.method = method
        self.raw_path = raw_path
        path, _, self.query_string = raw_path.partition("?")
        self.path = unquote(path) if "%" in path else path
        self.headers = headers
        self.http11 = http11
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.body = body
        """None when the request has no body (no Content-Length, not chunked)."""
        self.client_ip = client_ip
        self.scheme = "http"
        self._query: MultiDictProxy[str] | None = None
        self.started = False
        """Response head sent (a failure now can only cut the connection)."""
        self.finished = False

    @property
    def query(self) -> MultiDictProxy[str]:
        if self._query is None:
            self._query = MultiDictProxy(MultiDict(parse_qsl(self.query_string, keep_blank_values=True)))
        return self._query

    # -- answering ----------------------------------------------------------------------

    def reply(self, reply: Reply) -> None:
        """Send a complete response (Content-Length framed)."""
        self._protocol.write_reply(self, reply)

    def start_stream(self, status: int, headers: CIMultiDict[str] | Mapping[str, str], reason: str | None = None) -> None:
        """Send the head of a response whose body follows in `write` calls (chunked on HTTP/1.1)."""
        self._protocol.write_stream_head(self, status, headers, reason)

    async def write(self, data: bytes) -> None:
        """Send part of a streamed body; waits while the client is not reading (backpressure)."""
        await self._protocol.write_chunk(self, data)

    async def write_eof(self) -> None:
        await self._protocol.write_stream_end(self)

    def abort(self) -> None:
        """Cut the connection now (a broken stream must not look like a complete one)."""
        self._protocol.abort()
