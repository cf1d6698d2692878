"""Keep-alive connections to upstreams, and one request/response exchange over them."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
from dataclasses import dataclass
from typing import AsyncIterator

from multidict import CIMultiDict
from yarl import URL

from proxy.transport.connection import Connection, ConnectFailed, ConnectTimeout, FirstByteTimeout, TransportError


@dataclass(frozen=True, slots=True, eq=False)
class Origin:
    """Where an upstream lives, parsed once per configured URL rather than per request
    (`origin_of` returns one shared instance per URL, so identity is equality)."""

    scheme: str
    host: str
    port: int
    host_header: str
    base_path: str
    """The URL's path (no trailing slash): request targets are appended to it."""


@functools.lru_cache(maxsize=1024)
def origin_of(url: str) -> Origin:
    parsed = URL(url, encoded=True)
    default_port = 443 if parsed.scheme == "https" else 80
    return Origin(
        scheme=parsed.scheme,
        host=parsed.raw_host or "",
        port=parsed.port or default_port,
        host_header=host_header(parsed),
        base_path=parsed.raw_path.rstrip("/"),
    )

IDEMPOTENT_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
"""RFC 9110 9.2.2: requests a client may send again when a reused connection turns out
to have been closed by the server before it answered (RFC 9112 9.3.1)."""

_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


def request_head(method: str, target: str, host: str, headers: CIMultiDict[str], body: object) -> bytes:
    """The request line and headers. `headers` is already free of hop-by-hop and framing
    headers (proxy.headers); the transport adds its own framing and Host."""
    parts = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers.items():
        parts.append(f"{name}: {value}\r\n")
    if isinstance(body, bytes):
        parts.append(f"Content-Length: {len(body)}\r\n\r\n")
    elif body is None:
        parts.append("Content-Length: 0\r\n\r\n" if method in _BODY_METHODS else "\r\n")
    else:
        parts.append("Transfer-Encoding: chunked\r\n\r\n")
    # aiohttp's server decodes header bytes as UTF-8 with surrogateescape: this gives
    # back the bytes the client sent.
    return "".join(parts).encode("utf-8", "surrogateescape")


def host_header(url: URL) -> str:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    port = url.explicit_port
    default = 443 if url.scheme == "https" else 80
    return host if port is None or port == default else f"{host}:{port}"


def _os_reason(exc: OSError) -> str:
    """asyncio's loop words a refused connect "Connect call failed ('10.0.0.5', 8000)",
    uvloop's "Connection refused": name the OS reason on both (DNS errors keep theirs)."""
    if isinstance(exc, ssl.SSLError):  # its errno is OpenSSL's, not the OS's
        return exc.strerror or getattr(exc, "reason", None) or str(exc)
    if exc.errno is not None and exc.errno > 0 and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


class Pool:
    """Idle connections per upstream origin, newest first; idle ones are closed after
    `keepalive_seconds` (below the 60 s most servers allow, above uvicorn's 5 s is
    harmless: a server-closed connection is noticed and dropped before reuse)."""

    def __init__(self, *, keepalive_seconds: float = 30.0) -> None:
        self._keepalive_seconds = keepalive_seconds
        self._idle: dict[Origin, list[Connection]] = {}
        self._open: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None
        self.opened_total = 0

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
        *,
        connect_timeout_seconds: float,
        first_byte_timeout_seconds: float,
    ) -> Connection:
        """Send the request; return the connection once the response head is in. The
        caller reads the body from it and must hand it back with `release`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + first_byte_timeout_seconds
        if "Expect" in headers:  # the body follows at once; no 100-continue handshake
            headers = headers.copy()
            del headers["Expect"]
        head = request_head(method, origin.base_path + target, origin.host_header, headers, body)
        replayable = method in IDEMPOTENT_METHODS and not (body is not None and not isinstance(body, bytes))
        fresh = False
        while True:
            conn = await self._acquire(origin, min(connect_timeout_seconds, max(0.0, deadline - loop.time())), deadline, fresh)
            conn.begin(head_only=method == "HEAD")
            conn.send(head, body)
            timer = loop.call_at(deadline, _first_byte_timeout, conn, first_byte_timeout_seconds)
            try:
                await conn.response_head()
                return conn
            except TransportError as exc:
                self.release(conn)
                if exc.sent_nothing and replayable:
                    replayable = False  # once, on a new connection: the other idle ones
                    fresh = True  # may have been closed by the server just as well
                    continue
                raise
            except BaseException:
                self.release(conn)
                raise
            finally:
                timer.cancel()

    def release(self, conn: Connection) -> None:
        """Take a connection back: pooled when its exchange ended cleanly, else closed."""
        conn.finish()
        if not conn.reusable:
            conn.close()
            return
        origin = conn.origin
        assert origin is not None
        conn.reused = True
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(origin, []).append(conn)
        if self._sweeper is None:
            self._arm_sweeper()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost

    # -- internals --------------------------------------------------------------------

    async def _acquire(self, origin: Origin, connect_timeout_seconds: float, deadline: float, fresh: bool = False) -> Connection:
        idle = None if fresh else self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return await self._connect(origin, connect_timeout_seconds, deadline)

    async def _connect(self, origin: Origin, timeout_seconds: float, deadline: float) -> Connection:
        scheme, host, port = origin.scheme, origin.host, origin.port
        loop = asyncio.get_running_loop()
        context = self._tls_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout_seconds):
                _, conn = await loop.create_connection(lambda: Connection(self._lost), host, port, ssl=context)
        except TimeoutError:
            if loop.time() >= deadline:
                raise FirstByteTimeout("no response before the deadline (still connecting)")
            raise ConnectTimeout("timed out connecting to upstream") from None
        except OSError as exc:
            raise ConnectFailed(_os_reason(exc)) from None
        conn.origin = origin
        self._open.add(conn)
        self.opened_total += 1
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _lost(self, conn: Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.origin) if conn.origin is not None else None
        if idle and conn in idle:  # the server closed an idle one
            idle.remove(conn)

    def _arm_sweeper(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(self._keepalive_seconds / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = asyncio.get_running_loop().time() - self._keepalive_seconds
        for idle in self._idle.values():
            # Newest last: the stale ones are at the front.
            while idle and idle[0].idle_since < cutoff:
                idle.pop(0).close()
        if any(self._idle.values()):
            self._arm_sweeper()


def _first_byte_timeout(conn: Connection, timeout_seconds: float) -> None:
    # The error is built only when the deadline passes, not once per request.
    conn.abort(FirstByteTimeout(f"no response within {timeout_seconds:g} s"))
