"""One HTTP/1.1 connection to an upstream: writes a request, parses the response.

Why not aiohttp's client: per request it builds a ClientRequest, a ClientResponse, a
StreamReader, a payload writer and a timer context, which was most of the proxy's added
latency (bench/overhead.py). This is the small part a reverse proxy needs: the llhttp
parser (httptools) fills a list of chunks that the forwarder takes as they come, with
backpressure (reading pauses while the forwarder is behind), and nothing else.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, AsyncIterator, Callable

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from proxy.transport.pool import Origin

HIGH_WATER_BYTES = 256 * 1024
"""Reading from the upstream pauses while this much is received and not yet taken."""

MAX_HEAD_BYTES = 64 * 1024
"""A response's status line and headers (and any 1xx heads before it) may not exceed this."""


class TransportError(Exception):
    """The upstream exchange failed; `sent_nothing` marks a reused connection that the
    server closed before answering (safe to retry an idempotent request)."""

    def __init__(self, message: str, *, sent_nothing: bool = False) -> None:
        super().__init__(message)
        self.sent_nothing = sent_nothing


class ConnectFailed(TransportError):
    """No connection could be made (refused, unreachable, DNS)."""


class ConnectTimeout(TransportError):
    """The TCP (or TLS) connection was not made within the connect timeout."""


class FirstByteTimeout(TransportError):
    """The upstream sent no response head before the deadline."""


class IdleTimeout(TransportError):
    """The upstream went silent mid-response for longer than allowed."""


class Connection(asyncio.Protocol):
    """Serves one request at a time; the pool hands it out and takes it back."""

    def __init__(self, on_lost: Callable[["Connection"], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_lost = on_lost
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self.reused = False
        # The exchange in progress (reset by begin()).
        self._active = False
        self._head_only = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: TransportError | None = None
        self._received_any = False
        self._head_bytes = 0
        self._raw_headers: list[tuple[str, str]] = []
        self._interim = False
        self._chunks: deque[bytes] = deque()
        self._buffered_bytes = 0
        self._reading_paused = False
        self._complete = False
        self._keep_alive = False
        self._eof_delimited = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._writer: asyncio.Task[None] | None = None
        self.origin: Origin | None = None  # set by the pool
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.content_length: int | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        if not self._active or self._complete:
            # Bytes nobody asked for (more than Content-Length said, or chatter on an
            # idle connection): the stream is out of step, never reuse it.
            self._keep_alive = False
            self.close()
            return
        self._received_any = True
        head_pending = not self.status
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(TransportError("upstream switched protocols, which the proxy does not forward"))
            return
        except httptools.HttpParserError as exc:
            self._fail(TransportError(f"upstream sent a malformed response: {exc}"))
            return
        if head_pending and not self.status:
            # The parser holds a head until it is complete: bound what a broken or
            # hostile upstream can make it hold.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(TransportError(f"upstream sent a response head over {MAX_HEAD_BYTES // 1024} KiB"))

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._keep_alive = False
        if self._active and not self._complete and self._error is None:
            if self._eof_delimited and exc is None:
                self._complete = True  # a body without length ends when the connection does
            elif self.status:
                self._error = TransportError("upstream closed the connection mid-response")
            else:
                message = "upstream closed the connection before responding"
                self._error = TransportError(message, sent_nothing=self.reused and not self._received_any)
            self._wake()
        _settle(self._drain_waiter)
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        _settle(self._drain_waiter)

    # -- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            # A message after the one asked for, in the same read (bytes past
            # Content-Length): stop the parser before it overwrites this response's
            # status and headers; data_received then drops the connection.
            raise TransportError("upstream sent more than the response")
        self._raw_headers = []

    def on_status(self, reason: bytes) -> None:
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: the real head follows
            return
        self._interim = False
        self.status = status
        headers = CIMultiDict(self._raw_headers)
        self.headers = CIMultiDictProxy(headers)
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._keep_alive = self._parser.should_keep_alive()
        # RFC 9112 6.3: chunked framing only when it is the last coding applied.
        codings = ",".join(headers.getall("Transfer-Encoding", ()))
        chunked = codings.rsplit(",", 1)[-1].strip().lower() == "chunked"
        self._eof_delimited = self.content_length is None and not chunked and status not in (204, 304)
        if self._head_only:
            # llhttp would wait for the body Content-Length announces: end here, and do
            # not reuse a connection whose parser is out of step.
            self._complete = True
            self._keep_alive = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._chunks.append(body)
        self._buffered_bytes += len(body)
        if self._buffered_bytes > HIGH_WATER_BYTES and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        self._wake()

    # -- used by the pool and the forwarder ---------------------------------------------

    @property
    def reusable(self) -> bool:
        return self._complete and self._keep_alive and not self.lost and not self._chunks and self._writer is None

    def begin(self, *, head_only: bool) -> None:
        """Reset the per-exchange state before a request is written."""
        self._active = True
        self._head_only = head_only
        self._error = None
        self._received_any = False
        self._head_bytes = 0
        self._complete = False
        self._keep_alive = False
        self._eof_delimited = False
        self._interim = False
        self._chunks.clear()
        self._buffered_bytes = 0
        self.status = 0
        self.reason = ""
        self.content_length = None

    def finish(self) -> None:
        """The exchange is over (whatever its outcome)."""
        self._active = False
        writer = self._writer
        if writer is not None:
            if writer.done():
                self._writer = None
            else:  # the answer came before the whole body went out: the framing is lost
                writer.cancel()
                self._keep_alive = False
        self._resume_reading()

    def send(self, head: bytes, body: bytes | AsyncIterator[bytes] | None) -> None:
        """Write the request: at once when the body is in memory, else chunked from a task
        (the upstream may answer before the body is all sent)."""
        assert self.transport is not None
        if body is None:
            self.transport.write(head)
        elif isinstance(body, bytes):
            self.transport.writelines((head, body))
        else:
            self._writer = self._loop.create_task(self._write_chunked(head, body))

    async def _write_chunked(self, head: bytes, body: AsyncIterator[bytes]) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(head)
        try:
            async for piece in body:
                if self.lost:
                    return
                if piece:
                    transport.writelines((b"%x\r\n" % len(piece), piece, b"\r\n"))
                if self._writing_paused:
                    self._drain_waiter = self._loop.create_future()
                    await self._drain_waiter
                    self._drain_waiter = None
        except (Exception, asyncio.CancelledError) as exc:
            # The client's body failed: too large, client gone, or cancelled by a server
            # shutting down. Only this task's own cancellation (release()) propagates.
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                raise
            self._fail(TransportError(f"the request body could not be read: {type(exc).__name__}"))
            return
        if not self.lost:
            transport.write(b"0\r\n\r\n")

    async def response_head(self) -> None:
        """Wait until status and headers are in (or the exchange failed)."""
        while not self.status and self._error is None:
            await self._wait()
        if self._error is not None:
            raise self._error

    @property
    def complete(self) -> bool:
        """The whole response is received (some of it may not be taken yet)."""
        return self._complete

    def read_nowait(self) -> bytes:
        """Everything received and not yet taken."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered_bytes = 0
        self._resume_reading()
        return data

    async def read(self) -> bytes:
        """The next bytes of the body; b"" at its end. Raises if the exchange failed."""
        while True:
            if self._chunks:
                return self.read_nowait()
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()

    def abort(self, error: TransportError) -> None:
        """End the exchange with `error` (the idle watchdog or the first-byte deadline)."""
        self._fail(error)

    def close(self) -> None:
        self._keep_alive = False
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            # A graceful close waits for unsent request bytes to go out, which never
            # happens if the upstream stopped reading: the socket would stay open.
            transport.abort()
        elif not transport.is_closing():
            transport.close()

    # -- internals --------------------------------------------------------------------

    def _fail(self, error: TransportError) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self.close()
        self._wake()

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        _settle(self._waiter)

    def _resume_reading(self) -> None:
        if self._reading_paused and not self.lost and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()


def _settle(waiter: "asyncio.Future[None] | None") -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
