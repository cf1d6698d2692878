"""The data path: forward one request to an upstream and stream the answer back.

It knows nothing of energy. The layer above passes an `Exchange` whose hooks see the
response and may append bytes at the end of a stream or headers to a buffered body;
the transport only moves bytes, enforces limits and timeouts, and maps failures to
clean JSON errors.
"""

from __future__ import annotations

import asyncio
import functools
import enum
import logging
from typing import AsyncIterator, Mapping, Protocol

import aiohttp
import orjson
from aiohttp import web
from aiohttp.streams import EofStream
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import Timeouts
from proxy.headers import client_response_headers

log = logging.getLogger("carbon_proxy.forward")


class BodyMode(enum.Enum):
    STREAM = "stream"
    """Forward chunks as they come, through Exchange.feed and Exchange.finish."""
    BUFFER = "buffer"
    """Hold the whole (bounded) body, then send it with Exchange.complete's headers."""


class Exchange(Protocol):
    def response_started(self, status: int, headers: CIMultiDictProxy[str]) -> BodyMode: ...

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send now for this upstream chunk (usually the chunk itself)."""
        ...

    async def finish(self) -> bytes:
        """Bytes to append when the upstream stream ended cleanly."""
        ...

    async def complete(self, body: bytes) -> Mapping[str, str]:
        """Extra response headers for a buffered body."""
        ...

    def failed(self, reason: str) -> None:
        """The exchange ended early: upstream error, timeout or client gone."""
        ...


class UpstreamError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def json_error(status: int, kind: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """An OpenAI-style error body: every client library already knows how to show it."""
    body = orjson.dumps({"error": {"message": message, "type": kind, "code": status}})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


class _Watchdog:
    """Idle timeout without a timer per chunk: chunks only stamp a time; one timer re-arms."""

    def __init__(self, timeout_seconds: float, on_expire: "asyncio.Future[None] | None" = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.clock = self._loop.time
        self._timeout = timeout_seconds
        self.last = self._loop.time()
        self.expired = False
        self._response: aiohttp.ClientResponse | None = None
        self._closed: "asyncio.Future[None] | None" = None
        self._handle = self._loop.call_at(self.last + timeout_seconds, self._check)

    def watch(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        # aiohttp's C parser drops the payload of a body it cannot parse (a garbage chunk
        # header): the read would then wait for the idle timeout although the upstream
        # connection is gone. End it when the connection closes.
        connection = response.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is not None:
            closed = protocol.closed
            if closed is None:  # already lost
                self._connection_closed(None)
            else:
                self._closed = closed
                closed.add_done_callback(self._connection_closed)

    def _connection_closed(self, _: object) -> None:
        response = self._response
        if response is not None and not response.content.is_eof():
            response.content.set_exception(aiohttp.ClientPayloadError("upstream connection closed mid-response"))

    def touch(self) -> None:
        """A chunk arrived (hot loops may store `last = clock()` themselves)."""
        self.last = self._loop.time()

    def _check(self) -> None:
        due = self.last + self._timeout
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self.expired = True
        if self._response is not None:
            self._response.close()  # the pending read then fails and the exchange ends

    def cancel(self) -> None:
        self._handle.cancel()
        if self._closed is not None:  # pooled connections outlive the request
            self._closed.remove_done_callback(self._connection_closed)
            self._closed = None


@functools.lru_cache(maxsize=256)
def _client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    """One ClientTimeout per upstream's settings (Timeouts is frozen), not one per request."""
    return aiohttp.ClientTimeout(total=None, connect=timeouts.connect_seconds, sock_connect=timeouts.connect_seconds)


class Forwarder:
    """Pooled keep-alive client to upstreams, shared by all requests."""

    def __init__(self, *, max_buffer_bytes: int) -> None:
        self._max_buffer_bytes = max_buffer_bytes
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, enable_cleanup_closed=True)
        # auto_decompress=False: bytes pass through exactly as the upstream encoded them.
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"), cookie_jar=aiohttp.DummyCookieJar()
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(
        self,
        request: web.BaseRequest,
        *,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
        timeouts: Timeouts,
        exchange: Exchange,
        extra_headers: Mapping[str, str],
    ) -> web.StreamResponse:
        assert self._session is not None, "Forwarder.start() was not awaited"
        timeout = _client_timeout(timeouts)
        upstream: aiohttp.ClientResponse | None = None
        try:
            try:
                async with asyncio.timeout(timeouts.first_byte_seconds):
                    upstream = await self._session.request(
                        request.method, url, headers=headers, data=body, timeout=timeout, allow_redirects=False, compress=None
                    )
            except TimeoutError:
                raise UpstreamError(504, "upstream_timeout", f"upstream sent no response within {timeouts.first_byte_seconds:g} s")
            except aiohttp.ClientConnectorError as exc:
                raise UpstreamError(502, "upstream_unreachable", f"cannot connect to upstream: {exc.strerror or exc}")
            except aiohttp.ServerTimeoutError:
                raise UpstreamError(504, "upstream_timeout", "timed out connecting to upstream")
            except aiohttp.ClientError as exc:
                raise UpstreamError(502, "upstream_error", f"upstream failed before responding: {type(exc).__name__}")

            mode = exchange.response_started(upstream.status, upstream.headers)
            length = upstream.content_length
            if mode is BodyMode.BUFFER and (length is None or length <= self._max_buffer_bytes):
                return await self._buffered(request, upstream, timeouts, exchange, extra_headers)
            return await self._streamed(request, upstream, timeouts, exchange, extra_headers)
        except UpstreamError as exc:
            exchange.failed(exc.kind)
            return json_error(exc.status, exc.kind, exc.message, extra_headers)
        except BaseException:
            exchange.failed("client_disconnected")
            raise
        finally:
            if upstream is not None:
                upstream.close()

    async def _buffered(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        timeouts: Timeouts,
        exchange: Exchange,
        extra_headers: Mapping[str, str],
    ) -> web.StreamResponse:
        content = upstream.content
        if content.is_eof() and content.exception() is None:
            # The whole body came with the headers (small answers do): nothing can stall,
            # so no idle watchdog (a timer per request) is needed to read it.
            body = content.read_nowait()
            if len(body) > self._max_buffer_bytes:
                return await self._streamed(request, upstream, timeouts, exchange, extra_headers, prefix=body)
            return await self._send_buffered(upstream, body, exchange, extra_headers)
        parts: list[bytes] = []
        size = 0
        watchdog = _Watchdog(timeouts.idle_seconds)
        watchdog.watch(upstream)
        try:
            async for chunk in upstream.content.iter_any():
                watchdog.touch()
                parts.append(chunk)
                size += len(chunk)
                if size > self._max_buffer_bytes:
                    # Too large to hold: send what we have and stream the rest.
                    return await self._streamed(request, upstream, timeouts, exchange, extra_headers, prefix=b"".join(parts))
        except aiohttp.ClientError:
            if watchdog.expired:
                raise UpstreamError(504, "upstream_timeout", f"upstream went silent for {timeouts.idle_seconds:g} s")
            raise UpstreamError(502, "upstream_error", "upstream closed the connection mid-response")
        finally:
            watchdog.cancel()
        return await self._send_buffered(upstream, b"".join(parts), exchange, extra_headers)

    @staticmethod
    async def _send_buffered(
        upstream: aiohttp.ClientResponse, body: bytes, exchange: Exchange, extra_headers: Mapping[str, str]
    ) -> web.StreamResponse:
        figures = await exchange.complete(body)
        headers = client_response_headers(upstream.headers, reframed=True)
        headers.update(extra_headers)
        headers.update(figures)
        return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)

    async def _streamed(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        timeouts: Timeouts,
        exchange: Exchange,
        extra_headers: Mapping[str, str],
        prefix: bytes = b"",
    ) -> web.StreamResponse:
        # The proxy may append figures, so it frames the body itself (chunked).
        headers = client_response_headers(upstream.headers, reframed=True)
        headers.update(extra_headers)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if request.version >= aiohttp.HttpVersion11:
            response.enable_chunked_encoding()
        await response.prepare(request)
        watchdog = _Watchdog(timeouts.idle_seconds)
        watchdog.watch(upstream)
        # Per chunk (the hot loop of every stream): bound methods, no iterator object in
        # between (readany is what iter_any calls), and the watchdog stamp inlined.
        feed = exchange.feed
        write = response.write
        read = upstream.content.readany
        clock = watchdog.clock
        try:
            if prefix:
                await write(feed(prefix))
            while True:
                try:
                    chunk = await read()
                except EofStream:
                    break
                if not chunk:
                    break
                watchdog.last = clock()
                out = feed(chunk)
                if out:
                    await write(out)
        except aiohttp.ClientError:
            # Headers are gone already: cut the connection so the client sees a broken
            # stream rather than a clean end that would pass for a complete answer.
            exchange.failed("upstream_timeout" if watchdog.expired else "upstream_broken")
            response.force_close()
            if request.transport is not None:
                request.transport.close()
            return response
        finally:
            watchdog.cancel()
        tail = await exchange.finish()
        if tail:
            await response.write(tail)
        await response.write_eof()
        return response
