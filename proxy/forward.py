"""The data path: forward one request to an upstream and stream the answer back.

It knows nothing of energy. The layer above passes an `Exchange` whose hooks see the
response and may append bytes at the end of a stream or headers to a buffered body;
the transport only moves bytes, enforces limits and timeouts, and maps failures to
clean JSON errors.
"""

from __future__ import annotations

import asyncio
import enum
from typing import AsyncIterator, Callable, Mapping, Protocol

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Timeouts
from proxy.headers import client_response_headers
from proxy.server.messages import Reply, Request
from proxy.transport import Connection, ConnectFailed, ConnectTimeout, FirstByteTimeout, IdleTimeout, Pool, TransportError, origin_of


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


def json_error(status: int, kind: str, message: str, headers: Mapping[str, str] | None = None) -> Reply:
    """An OpenAI-style error body: every client library already knows how to show it."""
    body = orjson.dumps({"error": {"message": message, "type": kind, "code": status}})
    return Reply(status, body, {"Content-Type": "application/json", **(headers or {})})


class _Watchdog:
    """Idle timeout without a timer per chunk: chunks only stamp a time; one timer re-arms.

    While `writing`, the time goes to the client instead: a write blocked longer than
    `client_write_seconds` calls `cut_client` (a stuck reader must not hold the upstream)."""

    def __init__(
        self,
        timeout_seconds: float,
        conn: Connection,
        client_write_seconds: float | None = None,
        cut_client: Callable[[], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.clock = self._loop.time
        self._timeout = timeout_seconds
        self._conn = conn
        self._client_write = client_write_seconds if cut_client is not None else None
        self._cut_client = cut_client
        self.last = self._loop.time()
        self.writing = False
        """True while the forwarder waits on the client (since `last`): not the upstream's silence."""
        self.expired = False
        self.stalled = False
        self._handle = self._loop.call_at(self._next_check(), self._check)

    def _next_check(self) -> float:
        if self.writing and self._client_write is not None:
            return self.last + self._client_write
        due = self.last + self._timeout
        if self._client_write is not None:
            # A write may start at any time: look again within one client_write period.
            due = min(due, self._loop.time() + self._client_write)
        return due

    def _check(self) -> None:
        now = self._loop.time()
        if self.writing:
            if self._client_write is not None and now - self.last >= self._client_write:
                self.stalled = True
                assert self._cut_client is not None
                self._cut_client()
                return
            if self._client_write is None:
                self.last = now  # a slow client is not a silent upstream
        elif now >= self.last + self._timeout:
            self.expired = True
            self._conn.abort(IdleTimeout(f"upstream went silent for {self._timeout:g} s"))
            return
        self._handle = self._loop.call_at(max(self._next_check(), now), self._check)

    def cancel(self) -> None:
        self._handle.cancel()


class Forwarder:
    """Forwards requests over a keep-alive pool of upstream connections."""

    def __init__(self, *, max_buffer_bytes: int, client_write_seconds: float | None = None) -> None:
        self._max_buffer_bytes = max_buffer_bytes
        self._client_write_seconds = client_write_seconds
        self.pool = Pool()
        self.drain_deadline: float | None = None
        """Loop time at which a stopping server cuts what is still open (`shutdown`)."""

    async def start(self) -> None:
        """Nothing to open: the pool connects on first use."""

    async def close(self) -> None:
        await self.pool.close()

    async def forward(
        self,
        request: Request,
        *,
        upstream_url: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
        timeouts: Timeouts,
        exchange: Exchange,
        extra_headers: Mapping[str, str],
    ) -> Reply | None:
        upstream: Connection | None = None
        try:
            try:
                upstream = await self.pool.request(
                    request.method,
                    origin_of(upstream_url),
                    target,
                    headers,
                    body,
                    connect_timeout_seconds=timeouts.connect_seconds,
                    first_byte_timeout_seconds=timeouts.first_byte_seconds,
                )
            except FirstByteTimeout:
                raise UpstreamError(504, "upstream_timeout", f"upstream sent no response within {timeouts.first_byte_seconds:g} s")
            except ConnectTimeout:
                raise UpstreamError(504, "upstream_timeout", f"timed out connecting to upstream within {timeouts.connect_seconds:g} s")
            except ConnectFailed as exc:
                raise UpstreamError(502, "upstream_unreachable", f"cannot connect to upstream: {exc}")
            except TransportError as exc:
                raise UpstreamError(502, "upstream_error", f"upstream failed before responding: {exc}")

            mode = exchange.response_started(upstream.status, upstream.headers)
            length = upstream.content_length
            if mode is BodyMode.BUFFER and (length is None or length <= self._max_buffer_bytes):
                return await self._buffered(request, upstream, timeouts, exchange, extra_headers)
            return await self._streamed(request, upstream, timeouts, exchange, extra_headers)
        except UpstreamError as exc:
            exchange.failed(exc.kind)
            return json_error(exc.status, exc.kind, exc.message, extra_headers)
        except BaseException:
            # Cancelled (or the client's socket failed): the client left, or a stopping
            # server cut what was still open at its drain deadline.
            deadline = self.drain_deadline
            cut = deadline is not None and asyncio.get_running_loop().time() >= deadline - 0.05
            exchange.failed("shutdown" if cut else "client_disconnected")
            raise
        finally:
            if upstream is not None:
                self.pool.release(upstream)

    async def _buffered(
        self,
        request: Request,
        upstream: Connection,
        timeouts: Timeouts,
        exchange: Exchange,
        extra_headers: Mapping[str, str],
    ) -> Reply | None:
        if upstream.complete:
            # The whole body came with the head (small answers do): nothing can stall,
            # so no idle watchdog (a timer per request) is needed to read it.
            body = upstream.read_nowait()
            if len(body) > self._max_buffer_bytes:
                return await self._streamed(request, upstream, timeouts, exchange, extra_headers, prefix=body)
            return await self._send_buffered(upstream, body, exchange, extra_headers)
        parts: list[bytes] = []
        size = 0
        watchdog = _Watchdog(timeouts.idle_seconds, upstream)
        read = upstream.read
        try:
            while chunk := await read():
                watchdog.last = watchdog.clock()
                parts.append(chunk)
                size += len(chunk)
                if size > self._max_buffer_bytes:
                    # Too large to hold: send what we have and stream the rest.
                    return await self._streamed(request, upstream, timeouts, exchange, extra_headers, prefix=b"".join(parts))
        except IdleTimeout as exc:
            raise UpstreamError(504, "upstream_timeout", str(exc))
        except TransportError as exc:
            raise UpstreamError(502, "upstream_error", str(exc))
        finally:
            watchdog.cancel()
        return await self._send_buffered(upstream, b"".join(parts), exchange, extra_headers)

    @staticmethod
    async def _send_buffered(
        upstream: Connection, body: bytes, exchange: Exchange, extra_headers: Mapping[str, str]
    ) -> Reply | None:
        figures = await exchange.complete(body)
        headers = client_response_headers(upstream.headers, reframed=True)
        headers.update(extra_headers)
        headers.update(figures)
        return Reply(upstream.status, body, headers.items(), upstream.reason or None)

    async def _streamed(
        self,
        request: Request,
        upstream: Connection,
        timeouts: Timeouts,
        exchange: Exchange,
        extra_headers: Mapping[str, str],
        prefix: bytes = b"",
    ) -> Reply | None:
        # The proxy may append figures, so it frames the body itself (chunked).
        headers = client_response_headers(upstream.headers, reframed=True)
        headers.update(extra_headers)
        request.start_stream(upstream.status, headers.items(), upstream.reason or None)
        cut_client = request.abort
        watchdog = _Watchdog(timeouts.idle_seconds, upstream, self._client_write_seconds, cut_client)
        # Per chunk (the hot loop of every stream): bound methods and the watchdog stamp inlined.
        feed = exchange.feed
        write = request.write
        read = upstream.read
        clock = watchdog.clock
        try:
            if prefix:
                watchdog.writing = True
                await write(feed(prefix))
                watchdog.writing = False
            while chunk := await read():
                out = feed(chunk)
                if out:
                    watchdog.last = clock()
                    watchdog.writing = True  # a slow client is not a silent upstream
                    await write(out)
                    watchdog.writing = False
                watchdog.last = clock()
            tail = await exchange.finish()
            watchdog.last = clock()
            watchdog.writing = True
            if tail:
                await write(tail)
            await request.write_eof()
        except TransportError:
            # Headers are gone already: cut the connection so the client sees a broken
            # stream rather than a clean end that would pass for a complete answer.
            exchange.failed("upstream_timeout" if watchdog.expired else "upstream_broken")
            request.abort()
            return None
        except BaseException:
            if watchdog.stalled:
                # The client read nothing for client_write_seconds: it was cut (and with it
                # the upstream call); the work done so far is accounted.
                exchange.failed("client_stalled")
            raise
        finally:
            watchdog.cancel()
        return None
