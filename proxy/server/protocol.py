"""HTTP/1.1 on one client connection, parsed by httptools (llhttp): keep-alive, pipelining
(answered in order), streamed request bodies with backpressure, Expect: 100-continue,
HEAD, head limits, header-read and keep-alive timeouts, the connection cap's admission.

One task per connection runs its requests one after another; a request's handler gets a
proxy.server.messages.Request and answers through it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Mapping

import httptools
import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.header_guard import RateLimitedLog, where
from proxy.server.connections import ConnectionGuard
from proxy.server.messages import Reply, Request, RequestBody

log = logging.getLogger("carbon_proxy.server")
_log_rejected = RateLimitedLog(log)
_log_failed = RateLimitedLog(log)

Handler = Callable[[Request], Awaitable[Reply | None]]

PIPELINE_DEPTH = 16
"""Parsed requests waiting behind the one being answered; beyond it reading pauses."""

_REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 206: "Partial Content",
    301: "Moved Permanently", 302: "Found", 304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
    422: "Unprocessable Content", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}  # fmt: skip
_NO_BODY_STATUSES = frozenset((204, 304))


@dataclass(frozen=True, slots=True)
class Limits:
    header_read_seconds: float = 10.0
    keepalive_seconds: float = 75.0
    max_line_bytes: int = 8190
    """Request line and each header line (aiohttp's defaults, so clients see no change)."""
    max_headers: int = 128
    max_head_bytes: int = 64 * 1024


class _HeadRejected(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def error_body(status: int, kind: str, message: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "code": status}})


def _describe(exc: httptools.HttpParserError) -> tuple[str, str]:
    """(error type, message) for a client; never the bytes it sent."""
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return "invalid_method", "the request method is not valid"
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return "invalid_request_target", "the request target is not a valid path"
    if "header" in str(exc).lower():
        return "invalid_header", "a header name or value is not valid"
    return "bad_request", "the request is not valid HTTP/1.1"


def _decode(raw: bytes) -> str:
    # As aiohttp does: UTF-8, with undecodable bytes kept as surrogates (never an exception here).
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape")


class HttpProtocol(asyncio.Protocol):
    def __init__(self, handler: Handler, guard: ConnectionGuard, limits: Limits, connections: set["HttpProtocol"]) -> None:
        self._handler = handler
        self._guard = guard
        self._limits = limits
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._client_ip: str | None = None
        self._refused = False
        # the head being parsed
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._in_head = False
        self._body: RequestBody | None = None
        # requests and their answers
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._current: Request | None = None
        self._closing = False
        """Close after the response in progress (Connection: close, errors, shutdown)."""
        self._read_paused: set[str] = set()
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- ClientConnection (proxy.server.connections) ---------------------------------------

    def is_idle(self) -> bool:
        return self._task is None and not self._in_head and not self._queue

    def close_idle(self) -> None:
        self._close()

    @property
    def busy(self) -> bool:
        return self._task is not None

    # -- connection events ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is no asyncio.Transport subclass
        if not self._guard.admit(self):
            self._refused = True
            self._transport.write(self._guard.refusal())  # type: ignore[union-attr]
            self._transport.close()  # type: ignore[union-attr]
            return
        self._connections.add(self)
        peer = transport.get_extra_info("peername")
        self._client_ip = peer[0] if isinstance(peer, tuple) else None
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._refused:
            return
        self._connections.discard(self)
        self._guard.release(self)
        self._cancel_timers()
        lost = ConnectionResetError("the client closed the connection")
        if self._body is not None:
            self._body.fail(lost)
        for request in self._queue:
            if request.body is not None:
                request.body.fail(lost)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(lost)
        if self._task is not None:
            self._task.cancel()  # the client left: stop its work (the upstream call too)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject_head(400, "bad_request", "protocol upgrades are not supported")
        except _HeadRejected as exc:
            self._reject_head(exc.status, exc.kind, exc.message)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadRejected):
                self._reject_head(cause.status, cause.kind, cause.message)
            elif self._body is not None:
                # A broken body (bad chunk framing): the handler reading it sees the error.
                self._body.fail(ConnectionResetError(f"malformed request body: {exc}"))
                self._body = None
                self._stop_reading_and_close_after()
            else:
                self._reject_head(400, *_describe(exc))

    def eof_received(self) -> bool | None:
        # The client shut its side: as aiohttp does, take it as gone (the transport closes,
        # connection_lost cancels the work in progress). Clients that half-close and still
        # wait for an answer are rare; a vanished client holding an upstream is not.
        if self._body is not None:
            self._body.fail(ConnectionResetError("the client closed its side mid-body"))
        return False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._header_timer = self._loop.call_later(self._limits.header_read_seconds, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_line_bytes:
            raise _HeadRejected(400, "request_header_too_large", f"the request target exceeds {self._limits.max_line_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._limits
        size = len(name) + len(value)
        self._head_bytes += size
        if size > limits.max_line_bytes or self._head_bytes > limits.max_head_bytes:
            raise _HeadRejected(400, "request_header_too_large", "a request header or the request head is too long")
        if len(self._headers) >= limits.max_headers:
            raise _HeadRejected(400, "request_header_too_large", f"more than {limits.max_headers} request headers")
        self._headers.append((_decode(name), _decode(value)))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        parser = self._parser
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        method = parser.get_method().decode("ascii", "replace")
        http11 = parser.get_http_version() == "1.1"
        length_text = headers.get("Content-Length")
        content_length = int(length_text) if length_text is not None and length_text.strip().isdigit() else None
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        body = None
        if chunked or (content_length or 0) > 0:
            expect = http11 and headers.get("Expect", "").lower() == "100-continue"
            body = RequestBody(self, expect)
        self._body = body
        request = Request(
            self, method, _decode(self._url), headers, http11, parser.should_keep_alive(), content_length, body, self._client_ip
        )
        self._queue.append(request)
        if len(self._queue) > PIPELINE_DEPTH:
            self._pause_reading("pipeline")
        if self._task is None and not self._closing:
            self._task = self._loop.create_task(self._serve())

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body.feed(body)

    def on_message_complete(self) -> None:
        if self._body is not None:
            self._body.feed_eof()
            self._body = None

    # -- flow control (called by RequestBody) ---------------------------------------------

    def pause_body(self) -> None:
        self._pause_reading("body")

    def resume_body(self) -> None:
        self._resume_reading("body")

    def send_continue(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _pause_reading(self, reason: str) -> None:
        if not self._read_paused and self._transport is not None:
            self._transport.pause_reading()
        self._read_paused.add(reason)

    def _resume_reading(self, reason: str) -> None:
        self._read_paused.discard(reason)
        if not self._read_paused and self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    # -- answering requests, in order ----------------------------------------------------

    async def _serve(self) -> None:
        try:
            while self._queue and self._transport is not None:
                request = self._queue.popleft()
                if len(self._queue) <= PIPELINE_DEPTH // 2:
                    self._resume_reading("pipeline")
                self._current = request
                if not await self._answer(request):
                    return
                self._current = None
                body = request.body
                if not request.keep_alive or self._closing or (body is not None and not body.complete):
                    # An unread body would be taken for the next request: close instead.
                    self._close()
                    return
        finally:
            self._task = None
            self._current = None
        if self._transport is not None and not self._transport.is_closing():
            self._arm_idle()

    async def _answer(self, request: Request) -> bool:
        """Run the handler and send its answer; False when the connection is done for."""
        try:
            reply = await self._handler(request)
        except asyncio.CancelledError:
            self.abort()  # shutdown past the drain deadline, or the client left: never a clean end
            raise
        except ConnectionError:
            self.abort()
            return False
        except Exception as exc:
            _log_failed(logging.ERROR, "request handler failed (%s); answered 500", where(exc))
            if request.started:
                self.abort()
                return False
            self.write_reply(request, Reply(500, error_body(500, "internal_error", "the proxy failed to answer this request"),
                                            {"Content-Type": "application/json"}))  # fmt: skip
            return True
        if reply is not None and not request.started:
            self.write_reply(request, reply)
        elif not request.finished:
            self.abort()  # a stream left unfinished must not look complete
            return False
        return True

    def _head(self, request: Request, status: int, reason: str | None, headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[str]:
        lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}\r\n"]
        items = headers.items() if isinstance(headers, Mapping) else headers
        lines += [f"{name}: {value}\r\n" for name, value in items]
        if not request.keep_alive or self._closing:
            lines.append("Connection: close\r\n")
        elif not request.http11:
            lines.append("Connection: keep-alive\r\n")
        return lines

    def write_reply(self, request: Request, reply: Reply) -> None:
        request.started = request.finished = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if request.body is not None and not request.body.complete and request.body.received == 0 and not request.body.continue_sent:
            self._closing = True  # the client may still send the body it announced: do not read it as a request
        lines = self._head(request, reply.status, reply.reason, reply.headers)
        body = reply.body
        if reply.status not in _NO_BODY_STATUSES:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1", "replace")
        transport.write(head if request.method == "HEAD" or not body else head + body)

    def write_stream_head(self, request: Request, status: int, headers: Mapping[str, str] | Iterable[tuple[str, str]], reason: str | None) -> None:
        request.started = True
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if not request.http11:
            self._closing = True  # HTTP/1.0: the body ends when the connection does
        lines = self._head(request, status, reason, headers)
        if request.http11 and request.method != "HEAD":
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.append("\r\n")
        transport.write("".join(lines).encode("latin-1", "replace"))

    async def write_chunk(self, request: Request, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if not data or request.method == "HEAD":
            return
        if request.http11:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            transport.write(data)
        if self._write_paused:
            await self._wait_drain()

    async def write_stream_end(self, request: Request) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if request.http11 and request.method != "HEAD":
            transport.write(b"0\r\n\r\n")
        request.finished = True
        if self._write_paused:
            await self._wait_drain()

    async def _wait_drain(self) -> None:
        self._drain = self._loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    # -- closing -------------------------------------------------------------------------

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def close_when_done(self) -> None:
        """Shutdown: finish the response in progress, then close; close now if idle."""
        self._closing = True
        if self._task is None:
            self._close()

    def _stop_reading_and_close_after(self) -> None:
        self._closing = True
        self._pause_reading("closing")
        if self._task is None:
            self._close()

    def _reject_head(self, status: int, kind: str, message: str) -> None:
        # One line per interval, naming the kind only: the bytes may hold a credential.
        _log_rejected(logging.WARNING, "public listener answered %d %s", status, kind)
        self._in_head = False
        self._cancel_timers()
        transport = self._transport
        if self._task is None and transport is not None and not transport.is_closing():
            body = error_body(status, kind, message)
            transport.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Bad Request')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
        # With a request in progress, its answer goes out first; the broken rest is dropped.
        self._stop_reading_and_close_after()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._in_head:
            self._guard.count("header_timeout")
            self._in_head = False
            self._stop_reading_and_close_after()

    def _arm_idle(self) -> None:
        if self._idle_timer is None and not self._closing:
            self._idle_timer = self._loop.call_later(self._limits.keepalive_seconds, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if self.is_idle():
            self._guard.count("keepalive_timeout")
            self._close()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._idle_timer = None

    def cancel(self) -> "asyncio.Task[None] | None":
        """Shutdown past its deadline: stop the request in progress (its connection is cut)."""
        task = self._task
        if task is not None:
            task.cancel()
        return task
