"""proxy.transport (Pool, Connection) against real local servers that write exact bytes.

Each server is a raw `asyncio.start_server` whose handler is a small script: read a
request, write these bytes, close here, stay silent there. That is how faults are
staged; nothing of the transport is mocked. Every async test runs on asyncio's loop and
on uvloop (conftest.py). Each await that could hang is bounded (LIMIT), so a transport
that waits forever fails the test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import pytest
import uvloop
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.transport import Connection, ConnectFailed, ConnectTimeout, FirstByteTimeout, IdleTimeout, Pool, TransportError
from proxy.transport.connection import HIGH_WATER_BYTES
from proxy.transport.pool import Origin, host_header, origin_of


def split(url: URL) -> tuple[Origin, str]:
    """What proxy.forward passes: the upstream's origin (parsed once) and the request target."""
    return origin_of(str(url.origin())), url.raw_path_qs

LIMIT = 5.0
"""Upper bound for anything that should happen at once (generous: a loaded 2-core CI)."""


# -- a scripted HTTP/1.1 server ----------------------------------------------------------


@dataclass
class Request:
    method: str
    target: str
    head: bytes
    """The raw request line and headers, up to and including the blank line."""
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunk_sizes: list[int] | None
    """Sizes of the chunks as framed on the wire (None: not chunked)."""

    def header(self, name: str) -> bytes | None:
        wanted = name.lower().encode()
        values = [value for key, value in self.headers if key.lower() == wanted]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request off the wire; None on a clean end of stream between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    lines = head[:-4].split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    assert version == b"HTTP/1.1"
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" ")))
    request = Request(method.decode(), target.decode(), head, headers, b"", None)
    encoding = request.header("Transfer-Encoding")
    length = request.header("Content-Length")
    if encoding is not None:
        assert encoding == b"chunked" and length is None
        body = bytearray()
        sizes: list[int] = []
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                assert await reader.readexactly(2) == b"\r\n"  # no trailers
                break
            sizes.append(size)
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        request.body = bytes(body)
        request.chunk_sizes = sizes
    elif length is not None:
        request.body = await reader.readexactly(int(length))
    return request


@dataclass
class Peer:
    """One accepted connection, as the server's script sees it."""

    server: Server
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    index: int
    """0 for the first connection the server accepted, 1 for the next..."""
    served: int = 0
    """Requests read on this connection so far."""
    client_closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def request(self) -> Request | None:
        request = await read_request(self.reader)
        if request is None:
            self.client_closed.set()
        else:
            self.served += 1
            self.server.requests.append((self.index, request))
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_slowly(self, data: bytes, step: int) -> None:
        """`data` in writes of `step` bytes, letting the loop run between them (so the
        client sees many small reads, splitting framing at arbitrary places)."""
        for start in range(0, len(data), step):
            self.writer.write(data[start : start + step])
            await self.writer.drain()
            await asyncio.sleep(0)

    async def until_client_closes(self) -> None:
        """Read (and drop) until the client closes its side."""
        while await self.reader.read(65536):
            pass
        self.client_closed.set()

    def close(self) -> None:
        self.writer.close()


Script = Callable[[Peer], Awaitable[None]]


class Server:
    def __init__(self, script: Script) -> None:
        self._script = script
        self.accepted = 0
        self.peers: list[Peer] = []
        self.requests: list[tuple[int, Request]] = []
        """(connection index, request) for every request read, in order."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Server:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str = "/") -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(self, reader, writer, self.accepted)
        self.accepted += 1
        self.peers.append(peer)
        try:
            await self._script(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            peer.client_closed.set()
        except asyncio.CancelledError:
            pass  # close() at teardown; ending quietly keeps asyncio's callback from logging it
        finally:
            self._tasks.discard(task)
            writer.close()

    async def client_closed(self, index: int) -> None:
        """Wait until the client has closed connection `index`."""
        async with asyncio.timeout(LIMIT):
            await self.peers[index].client_closed.wait()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for peer in self.peers:
            peer.writer.close()
        await asyncio.sleep(0)


def response(body: bytes = b"ok", *, status: str = "200 OK", headers: str = "", version: str = "HTTP/1.1") -> bytes:
    return f"{version} {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def numbered(request: Request, peer: Peer) -> bytes:
    """An answer that says which connection and which request on it served it."""
    return response(f"conn{peer.index}-req{peer.served - 1}".encode())


async def keep_alive(peer: Peer) -> None:
    """A well-behaved server: answers every request on the connection, numbered."""
    while (request := await peer.request()) is not None:
        await peer.send(numbered(request, peer))


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(script: Script) -> Server:
        server = await Server(script).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    pool = Pool()
    yield pool
    await pool.close()


# -- the client side: what the forwarder does --------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    content_length: int | None
    body: bytes
    conn: Connection


async def fetch(
    pool: Pool,
    url: URL,
    method: str = "GET",
    *,
    headers: dict[str, str] | None = None,
    body: bytes | AsyncIterator[bytes] | None = None,
    first_byte_timeout: float = LIMIT,
) -> Response:
    """One exchange as proxy.forward drives it: request, read to the end, release."""
    async with asyncio.timeout(LIMIT * 2):
        conn = await pool.request(
            method,
            *split(url),
            CIMultiDict(headers or {}),
            body,
            connect_timeout_seconds=LIMIT,
            first_byte_timeout_seconds=first_byte_timeout,
        )
        try:
            parts = []
            while chunk := await conn.read():
                parts.append(chunk)
            return Response(conn.status, conn.reason, conn.headers, conn.content_length, b"".join(parts), conn)
        finally:
            pool.release(conn)


async def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not check():
        assert time.monotonic() < deadline, f"still not true after {LIMIT} s: {what}"
        await asyncio.sleep(0.01)


def payload(size: int, seed: int = 7) -> bytes:
    """Binary bytes (every byte value, CR and LF included) that a lossy path would alter."""
    return random.Random(seed).randbytes(size)


# -- the loops ---------------------------------------------------------------------------


async def test_runs_on_the_loop_its_id_names(request: pytest.FixtureRequest) -> None:
    # The conftest hook must really give uvloop to the [uvloop] variant.
    on_uvloop = isinstance(asyncio.get_running_loop(), uvloop.Loop)
    assert on_uvloop == request.node.name.endswith("[uvloop]"), request.node.name


# -- 1, 2: keep-alive --------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(serve, pool: Pool) -> None:
    server = await serve(keep_alive)
    first = await fetch(pool, server.url("/a"))
    second = await fetch(pool, server.url("/b"))
    assert (first.body, second.body) == (b"conn0-req0", b"conn0-req1")
    assert second.conn is first.conn
    assert server.accepted == 1
    assert pool.opened_total == 1
    assert pool.open_connections == 1
    assert [request.target for _, request in server.requests] == ["/a", "/b"]


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(response(b"bye", headers="Connection: close\r\n"), id="connection-close"),
        pytest.param(response(b"bye", version="HTTP/1.0"), id="http-1.0"),
    ],
)
async def test_response_that_ends_keep_alive_is_not_reused(serve, pool: Pool, answer: bytes) -> None:
    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(answer)
            await peer.until_client_closes()  # the server leaves it open: the client must close it
        else:
            await keep_alive(peer)

    server = await serve(script)
    assert (await fetch(pool, server.url())).body == b"bye"
    await server.client_closed(0)
    second = await fetch(pool, server.url())
    assert second.body == b"conn1-req0"
    assert server.accepted == 2
    assert pool.opened_total == 2


# -- 3: body framings --------------------------------------------------------------------


async def test_content_length_body_is_exact(serve, pool: Pool) -> None:
    body = payload(300_000)

    async def script(peer: Peer) -> None:
        while await peer.request():
            await peer.send(response(body))

    server = await serve(script)
    got = await fetch(pool, server.url())
    assert got.status == 200 and got.content_length == len(body)
    assert got.body == body
    assert (await fetch(pool, server.url())).body == body
    assert pool.opened_total == 1


async def test_chunked_body_split_across_many_small_writes_is_exact(serve, pool: Pool) -> None:
    parts = [payload(size, seed=size) for size in (1, 2, 15, 16, 17, 255, 256, 1000, 4096, 1)]
    body = b"".join(parts)

    async def script(peer: Peer) -> None:
        while await peer.request():
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            # 7-byte writes cut the status line, the size lines and the CRLFs anywhere.
            await peer.send_slowly(head + chunked(parts), step=7)

    server = await serve(script)
    got = await fetch(pool, server.url())
    assert got.content_length is None
    assert got.body == body
    # A chunked answer is framed: the connection is kept.
    assert (await fetch(pool, server.url())).body == body
    assert server.accepted == 1 and pool.opened_total == 1


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
async def test_body_delimited_by_close_is_read_to_the_end(serve, pool: Pool, version: str) -> None:
    body = payload(200_000)

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(f"{version} 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
        await peer.send_slowly(body[:100], step=10)
        await peer.send(body[100:])
        peer.close()  # the end of the body

    server = await serve(script)
    got = await fetch(pool, server.url())
    assert got.content_length is None
    assert got.body == body
    assert (await fetch(pool, server.url())).body == body
    assert server.accepted == 2  # a connection that closed is never reused


# -- 4, 5, 6: responses without a body (HEAD, 1xx, 204, 304) -----------------------------


async def test_head_with_content_length_completes_and_is_not_reused(serve, pool: Pool) -> None:
    async def script(peer: Peer) -> None:
        while await peer.request():
            # The length of the body a GET would have had; no body follows.
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")

    server = await serve(script)
    first = await fetch(pool, server.url(), "HEAD")  # bounded: must not wait for 1000 bytes
    assert first.status == 200 and first.content_length == 1000 and first.body == b""
    second = await fetch(pool, server.url(), "HEAD")
    assert second.body == b""
    assert server.accepted == 2 and pool.opened_total == 2
    await server.client_closed(0)


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "separate-writes"])
async def test_interim_1xx_responses_are_skipped(serve, pool: Pool, split: bool) -> None:
    interim = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"]
    final = response(b"final", headers="X-Final: yes\r\n")

    async def script(peer: Peer) -> None:
        while await peer.request():
            if split:
                for part in (*interim, final):
                    await peer.send(part)
                    await asyncio.sleep(0.01)
            else:
                await peer.send(b"".join(interim) + final)

    server = await serve(script)
    got = await fetch(pool, server.url(), "POST", body=b"x" * 10, headers={"Expect": "100-continue"})
    assert (got.status, got.reason, got.body) == (200, "OK", b"final")
    assert got.headers["X-Final"] == "yes"
    assert "Link" not in got.headers  # the hints' headers are not the response's
    assert (await fetch(pool, server.url())).body == b"final"
    assert server.accepted == 1


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", id="204"),
        pytest.param(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n", id="304"),
        # 304 may announce the length of the representation it stands for.
        pytest.param(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n", id="304-with-length"),
    ],
)
async def test_204_and_304_complete_at_once_and_keep_the_connection(serve, pool: Pool, answer: bytes) -> None:
    async def script(peer: Peer) -> None:
        while await peer.request():
            await peer.send(answer)  # and the connection stays open

    server = await serve(script)
    first = await fetch(pool, server.url())
    assert first.status in (204, 304) and first.body == b""
    second = await fetch(pool, server.url())
    assert second.status == first.status and second.body == b""
    assert server.accepted == 1


# -- 7: more bytes than Content-Length ----------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"EXTRA BYTES", id="garbage"),
        pytest.param(b"H", id="one-byte"),
        # A whole second, unrequested response in the same write: it must not replace
        # the head of the one that was asked for, nor leave the connection looking clean.
        pytest.param(response(b"evil", status="404 Not Found", headers="X-Which: second\r\n"), id="unrequested-response"),
    ],
)
async def test_bytes_after_content_length_are_dropped_and_the_connection_too(serve, pool: Pool, extra: bytes) -> None:
    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(response(b"hello", headers="X-Which: first\r\n") + extra)
            while (request := await peer.request()) is not None:  # only if wrongly reused
                await peer.send(numbered(request, peer))
        else:
            await keep_alive(peer)

    server = await serve(script)
    first = await fetch(pool, server.url())
    assert (first.status, first.reason, first.body) == (200, "OK", b"hello")
    assert first.headers["X-Which"] == "first"
    second = await fetch(pool, server.url())
    assert second.body == b"conn1-req0"
    assert server.accepted == 2


async def test_bytes_on_an_idle_connection_close_it(serve, pool: Pool) -> None:
    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(response(b"hello"))
            await asyncio.sleep(0.05)
            await peer.send(b"late bytes nobody asked for")
            await peer.until_client_closes()
        else:
            await keep_alive(peer)

    server = await serve(script)
    assert (await fetch(pool, server.url())).body == b"hello"
    await server.client_closed(0)
    await eventually(lambda: pool.open_connections == 0, "the idle connection that got stray bytes is closed")
    assert (await fetch(pool, server.url())).body == b"conn1-req0"


# -- 8, 9: malformed and broken responses -------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTX/1.1 200 OK\r\n\r\n", id="bad-protocol"),
        pytest.param(b"HTTP/1.1 2OO OK\r\n\r\n", id="bad-status"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\n", id="bad-content-length"),
    ],
)
async def test_malformed_head_raises_transport_error(serve, pool: Pool, answer: bytes) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)
        await peer.until_client_closes()  # never closes by itself: a hang would show

    server = await serve(script)
    with pytest.raises(TransportError, match="malformed response"):
        await fetch(pool, server.url())
    await server.client_closed(0)
    assert server.accepted == 1  # not retried: the server did answer


async def test_an_endless_response_head_is_cut_at_the_bound(serve, pool: Pool) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n")
        for i in range(2000):  # ~100 KiB of headers, never a blank line
            await peer.send(b"X-Filler-%04d: %s\r\n" % (i, b"x" * 32))
        await peer.until_client_closes()

    server = await serve(script)
    with pytest.raises(TransportError, match="head over 64 KiB"):
        await fetch(pool, server.url())
    await server.client_closed(0)


async def test_a_large_body_in_the_first_read_is_not_mistaken_for_a_large_head(serve, pool: Pool) -> None:
    body = bytes(range(256)) * 1024  # 256 KiB, sent with the head in one write
    async def script(peer: Peer) -> None:
        while await peer.request():
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    server = await serve(script)
    assert (await fetch(pool, server.url())).body == body


@pytest.mark.parametrize("split", [False, True], ids=["with-the-head", "after-the-head"])
async def test_bad_chunk_size_raises_transport_error(serve, pool: Pool, split: bool) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(head)
        if split:
            await asyncio.sleep(0.05)
        await peer.send(b"zz\r\nmore\r\n")
        await peer.until_client_closes()

    server = await serve(script)
    # Whether the bad size comes with the head (request() raises) or after it (read()
    # raises, once the good bytes are taken), it is an error, never a hang or a clean end.
    with pytest.raises(TransportError, match="malformed response"):
        await fetch(pool, server.url())
    await server.client_closed(0)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_close_mid_body_raises_after_the_bytes_that_came(serve, pool: Pool, framing: str) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        if framing == "chunked":
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n10\r\nabc")
        else:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
        await asyncio.sleep(0.02)
        peer.close()

    server = await serve(script)
    conn = await pool.request("GET", *split(server.url()), CIMultiDict(), None, connect_timeout_seconds=LIMIT, first_byte_timeout_seconds=LIMIT)
    received = b""
    try:
        async with asyncio.timeout(LIMIT):
            with pytest.raises(TransportError, match="mid-response") as raised:
                while chunk := await conn.read():
                    received += chunk
    finally:
        pool.release(conn)
    assert received.startswith(b"hello")
    assert not raised.value.sent_nothing
    await eventually(lambda: pool.open_connections == 0, "the broken connection is dropped")


async def test_close_before_responding_on_a_new_connection_raises_once(serve, pool: Pool) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.close()

    server = await serve(script)
    with pytest.raises(TransportError, match="before responding") as raised:
        await fetch(pool, server.url())
    # A new connection that the server drops is not the stale keep-alive case: no retry.
    assert not raised.value.sent_nothing
    assert server.accepted == 1


# -- 10: stale keep-alive -----------------------------------------------------------------


async def test_server_closing_an_idle_connection_does_not_fail_the_next_get(serve, pool: Pool) -> None:
    async def script(peer: Peer) -> None:
        request = await peer.request()
        assert request is not None
        await peer.send(numbered(request, peer))  # says keep-alive...
        peer.close()  # ...and closes right after

    server = await serve(script)
    assert (await fetch(pool, server.url())).body == b"conn0-req0"
    # At once: the close may or may not have been noticed yet; either way it must work.
    assert (await fetch(pool, server.url())).body == b"conn1-req0"
    assert (await fetch(pool, server.url())).body == b"conn2-req0"


async def closes_silently_on_second_request(peer: Peer) -> None:
    """Connection 0 answers one request, then takes the next one and closes without a
    byte (a keep-alive timeout racing the request); later connections behave."""
    if peer.index != 0:
        return await keep_alive(peer)
    request = await peer.request()
    assert request is not None
    await peer.send(numbered(request, peer))
    await peer.request()  # read completely, then dropped
    peer.close()


async def test_get_on_a_reused_connection_closed_without_a_byte_is_retried_once(serve, pool: Pool) -> None:
    server = await serve(closes_silently_on_second_request)
    assert (await fetch(pool, server.url("/first"))).body == b"conn0-req0"
    got = await fetch(pool, server.url("/second"))
    assert got.body == b"conn1-req0"
    assert [(index, request.target) for index, request in server.requests] == [(0, "/first"), (0, "/second"), (1, "/second")]
    assert pool.opened_total == 2


async def test_post_on_a_reused_connection_closed_without_a_byte_is_not_retried(serve, pool: Pool) -> None:
    server = await serve(closes_silently_on_second_request)
    assert (await fetch(pool, server.url())).body == b"conn0-req0"
    with pytest.raises(TransportError) as raised:
        await fetch(pool, server.url("/order"), "POST", body=b'{"buy": 1}')
    assert raised.value.sent_nothing
    assert server.accepted == 1
    assert [request.method for _, request in server.requests] == ["GET", "POST"]  # sent once


async def test_retry_goes_to_a_new_connection_not_another_stale_one(serve, pool: Pool) -> None:
    """Two idle connections that the server drops together: the one retry must not be
    spent on the other stale connection."""

    async def script(peer: Peer) -> None:
        if peer.index >= 2:
            return await keep_alive(peer)
        request = await peer.request()
        assert request is not None
        await peer.send(numbered(request, peer))
        await peer.request()
        peer.close()

    server = await serve(script)
    first, second = await asyncio.gather(fetch(pool, server.url()), fetch(pool, server.url()))
    assert {first.body, second.body} == {b"conn0-req0", b"conn1-req0"}
    assert pool.open_connections == 2
    got = await fetch(pool, server.url())
    assert got.body == b"conn2-req0"
    assert pool.opened_total == 3


# -- 11: deadlines and refused connections ------------------------------------------------


async def test_silent_server_raises_first_byte_timeout_near_the_deadline(serve, pool: Pool) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.until_client_closes()

    server = await serve(script)
    started = time.monotonic()
    with pytest.raises(FirstByteTimeout):
        await fetch(pool, server.url(), first_byte_timeout=0.3)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < LIMIT
    await server.client_closed(0)  # the connection is given up, not pooled
    await eventually(lambda: pool.open_connections == 0, "the timed-out connection is closed")


async def test_refused_connection_raises_connect_failed_with_the_os_reason(pool: Pool) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(ConnectFailed) as raised:
        await fetch(pool, URL(f"http://127.0.0.1:{port}/"))
    assert "refused" in str(raised.value).lower(), str(raised.value)
    assert pool.open_connections == 0


# -- 12: streamed request bodies ----------------------------------------------------------


async def test_streamed_request_body_is_sent_chunked_and_exact(serve, pool: Pool) -> None:
    pieces = [payload(size, seed=size) for size in (1, 100, 0, 70_000, 3)]  # b"" must not end the body

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece
            await asyncio.sleep(0)

    server = await serve(keep_alive)
    got = await fetch(pool, server.url("/upload"), "POST", body=body())
    assert got.body == b"conn0-req0"
    (_, request), = server.requests
    assert request.header("Transfer-Encoding") == b"chunked"
    assert request.header("Content-Length") is None
    assert request.body == b"".join(pieces)
    assert request.chunk_sizes == [len(piece) for piece in pieces if piece]
    assert (await fetch(pool, server.url())).body == b"conn0-req1"  # the framing ended cleanly


async def test_failing_request_body_raises_and_drops_the_connection(serve, pool: Pool) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"first part"
        await asyncio.sleep(0.01)
        raise ValueError("client went away")

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.until_client_closes()  # gets a head and a partial body, no end
        else:
            await keep_alive(peer)

    server = await serve(script)
    with pytest.raises(TransportError, match="request body could not be read: ValueError"):
        await fetch(pool, server.url(), "POST", body=body())
    await server.client_closed(0)
    assert (await fetch(pool, server.url())).body == b"conn1-req0"
    assert server.accepted == 2


async def test_answer_before_the_streamed_body_ends_drops_the_connection(serve, pool: Pool) -> None:
    """A server may refuse a body early (413); the rest of the body is not sent and the
    connection, whose request framing is now unfinished, is not reused."""
    more_wanted = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"start"
        await more_wanted.wait()  # held until the answer is in
        yield b"never sent"

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.reader.readuntil(b"\r\n\r\n")
            await peer.send(response(b"too large", status="413 Content Too Large"))
            await peer.until_client_closes()
        else:
            await keep_alive(peer)

    server = await serve(script)
    got = await fetch(pool, server.url(), "POST", body=body())
    more_wanted.set()
    assert (got.status, got.body) == (413, b"too large")
    await server.client_closed(0)
    assert (await fetch(pool, server.url())).body == b"conn1-req0"
    assert server.accepted == 2


# -- 13: backpressure ---------------------------------------------------------------------


async def test_slow_reader_gets_every_byte_and_buffering_stays_bounded(serve, pool: Pool) -> None:
    body = payload(4 * 1024 * 1024)

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(response(body))
        await peer.until_client_closes()

    server = await serve(script)
    conn = await pool.request("GET", *split(server.url()), CIMultiDict(), None, connect_timeout_seconds=LIMIT, first_byte_timeout_seconds=LIMIT)
    parts = []
    most_buffered = 0
    paused_seen = False
    try:
        async with asyncio.timeout(LIMIT * 2):
            while True:
                await asyncio.sleep(0.005)  # a slow client downstream
                most_buffered = max(most_buffered, conn._buffered_bytes)
                paused_seen = paused_seen or conn._reading_paused
                chunk = await conn.read()
                if not chunk:
                    break
                parts.append(chunk)
    finally:
        pool.release(conn)
    assert b"".join(parts) == body
    assert paused_seen, "reading was never paused for a reader 4 MiB behind"
    # One socket read past the mark at most (asyncio and uvloop read up to 256 KiB).
    assert most_buffered <= HIGH_WATER_BYTES + 512 * 1024, most_buffered
    assert len(parts) >= 4  # it was taken in pieces, not held whole


@pytest.mark.parametrize("aborted", [False, True], ids=["released", "aborted-then-released"])
async def test_reader_giving_up_while_reading_is_paused(serve, pool: Pool, aborted: bool) -> None:
    """The forwarder's client leaves mid-body (or its idle watchdog fires) while reading
    from the upstream is paused: handing the connection back closes it, no error."""

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(response(payload(2 * 1024 * 1024)))
            await peer.until_client_closes()
        else:
            await keep_alive(peer)

    server = await serve(script)
    conn = await pool.request("GET", *split(server.url()), CIMultiDict(), None, connect_timeout_seconds=LIMIT, first_byte_timeout_seconds=LIMIT)
    await eventually(lambda: conn._reading_paused, "reading pauses while nobody takes the body")
    if aborted:
        conn.abort(IdleTimeout("went silent"))
    pool.release(conn)
    await server.client_closed(0)
    assert (await fetch(pool, server.url())).body == b"conn1-req0"


async def test_concurrent_requests_each_get_their_own_answer(serve, pool: Pool) -> None:
    async def script(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            await asyncio.sleep(random.random() / 100)
            await peer.send(response(request.target.encode() * 50))

    server = await serve(script)
    for _ in range(3):  # the later rounds run on reused connections
        got = await asyncio.gather(*(fetch(pool, server.url(f"/r{i}")) for i in range(20)))
        assert [answer.body for answer in got] == [f"/r{i}".encode() * 50 for i in range(20)]
    assert pool.opened_total == server.accepted <= 20 * 3


# -- 14: idle sweeping and closing --------------------------------------------------------


async def test_idle_connections_are_closed_after_keepalive_seconds(serve) -> None:
    pool = Pool(keepalive_seconds=0.2)
    try:
        server = await serve(keep_alive)
        await fetch(pool, server.url())
        assert pool.open_connections == 1  # kept right after the exchange
        started = time.monotonic()
        await server.client_closed(0)
        assert time.monotonic() - started >= 0.15  # not at once: it was idle only that long
        await eventually(lambda: pool.open_connections == 0, "the swept connection is gone")
        assert (await fetch(pool, server.url())).body == b"conn1-req0"
    finally:
        await pool.close()


async def test_close_closes_idle_and_busy_connections(serve) -> None:
    async def stuck(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")  # never finishes
        await peer.until_client_closes()

    pool = Pool()
    server = await serve(keep_alive)
    busy_server = await serve(stuck)
    await asyncio.gather(fetch(pool, server.url()), fetch(pool, server.url()))
    busy = await pool.request("GET", *split(busy_server.url()), CIMultiDict(), None, connect_timeout_seconds=LIMIT, first_byte_timeout_seconds=LIMIT)
    assert pool.open_connections == 3
    await pool.close()
    await server.client_closed(0)
    await server.client_closed(1)
    await busy_server.client_closed(0)
    await eventually(lambda: pool.open_connections == 0, "no connection left open")
    async with asyncio.timeout(LIMIT):
        assert await busy.read() == b"part"
        with pytest.raises(TransportError, match="mid-response"):
            await busy.read()
    pool.release(busy)


# -- 15: the request head -----------------------------------------------------------------


async def test_request_head_host_target_and_framing(serve, pool: Pool) -> None:
    server = await serve(keep_alive)
    target = URL(f"http://127.0.0.1:{server.port}/v1/a%20b?q=1&r=%2F", encoded=True)
    await fetch(pool, target, headers={"Accept": "text/plain", "expect": "100-continue"})
    await fetch(pool, server.url("/post"), "POST")
    await fetch(pool, server.url("/put"), "PUT", body=b"")
    (_, get), (_, post), (_, put) = server.requests
    assert get.head.startswith(b"GET /v1/a%20b?q=1&r=%2F HTTP/1.1\r\n")
    assert get.header("Host") == f"127.0.0.1:{server.port}".encode()
    assert get.header("Accept") == b"text/plain"
    assert get.header("Expect") is None
    assert get.header("Content-Length") is None and get.header("Transfer-Encoding") is None
    assert post.header("Content-Length") == b"0" and post.header("Transfer-Encoding") is None
    assert put.header("Content-Length") == b"0"


async def test_non_ascii_header_bytes_round_trip(serve, pool: Pool) -> None:
    async def script(peer: Peer) -> None:
        while await peer.request():
            await peer.send(b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9 \xe2\x98\x95\r\nX-Raw: a\xffb\r\nContent-Length: 0\r\n\r\n")

    server = await serve(script)
    # As aiohttp's server hands them over: UTF-8, undecodable bytes as surrogates.
    sent = {"X-Name": "café ☕", "X-Raw": b"a\xffb".decode("utf-8", "surrogateescape")}
    got = await fetch(pool, server.url(), headers=sent)
    (_, request), = server.requests
    assert request.header("X-Name") == "café ☕".encode()
    assert request.header("X-Raw") == b"a\xffb"
    assert got.headers["X-Name"] == "café ☕"
    assert got.headers["X-Raw"].encode("utf-8", "surrogateescape") == b"a\xffb"


@pytest.mark.parametrize(
    "url, host",
    [
        ("http://example.com/x", "example.com"),
        ("http://example.com:80/x", "example.com"),  # the default port is left out, as clients do
        ("https://example.com:443/x", "example.com"),
        ("https://example.com:8443/x", "example.com:8443"),
        ("http://[::1]:8080/x", "[::1]:8080"),
        ("http://[::1]/x", "[::1]"),
    ],
)
def test_host_header(url: str, host: str) -> None:
    assert host_header(URL(url)) == host


async def test_an_upstream_url_with_a_path_prefixes_every_target(serve, pool: Pool) -> None:
    server = await serve(keep_alive)
    origin = origin_of(f"http://127.0.0.1:{server.port}/base/")
    assert (origin.base_path, origin.port) == ("/base", server.port)
    assert origin_of(f"http://127.0.0.1:{server.port}/base/") is origin  # parsed once, shared
    conn = await pool.request("GET", origin, "/v1/models?x=%2F", CIMultiDict(), None, connect_timeout_seconds=LIMIT, first_byte_timeout_seconds=LIMIT)
    while await conn.read():
        pass
    pool.release(conn)
    (_, request), = server.requests
    assert request.head.startswith(b"GET /base/v1/models?x=%2F HTTP/1.1\r\n")


def test_origin_defaults_the_port_by_scheme() -> None:
    assert origin_of("https://example.com").port == 443
    assert origin_of("http://example.com").port == 80
    assert origin_of("http://example.com").host_header == "example.com"


# -- found in review -------------------------------------------------------------------


async def test_a_failed_upload_to_an_upstream_that_stopped_reading_frees_its_socket(serve, pool: Pool) -> None:
    async def script(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")  # the head, then never another byte read
        await asyncio.sleep(3600)

    server = await serve(script)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(400):  # 25 MiB: far more than the socket buffers hold
            yield b"x" * 65536

    with pytest.raises(FirstByteTimeout):
        await pool.request("POST", *split(server.url()), CIMultiDict(), body(), connect_timeout_seconds=LIMIT, first_byte_timeout_seconds=0.5)
    # A graceful close would wait for the unsent bytes forever and hold the socket open.
    async with asyncio.timeout(LIMIT):
        while pool.open_connections:
            await asyncio.sleep(0.02)


async def test_an_upload_the_server_cancels_fails_at_once(serve, pool: Pool) -> None:
    # What aiohttp's server does to a request body when it shuts down: the body raises
    # CancelledError in the writer task, which is not itself being cancelled.
    async def script(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        await peer.until_client_closes()

    server = await serve(script)

    async def body() -> AsyncIterator[bytes]:
        yield b"part"
        await asyncio.sleep(0.05)
        raise asyncio.CancelledError()

    started = asyncio.get_running_loop().time()
    with pytest.raises(TransportError, match="request body could not be read"):
        await pool.request("POST", *split(server.url()), CIMultiDict(), body(), connect_timeout_seconds=LIMIT, first_byte_timeout_seconds=LIMIT)
    assert asyncio.get_running_loop().time() - started < LIMIT / 2  # not the first-byte timeout


@pytest.mark.parametrize(
    "codings",
    [pytest.param(b"Transfer-Encoding: chunked, gzip", id="chunked-not-last"),
     pytest.param(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip", id="two-headers")],
)
async def test_a_body_whose_last_coding_is_not_chunked_runs_to_the_close(serve, pool: Pool, codings: bytes) -> None:
    # RFC 9112 6.3: then the body is delimited by the connection closing, not by chunks.
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n" + codings + b"\r\n\r\nraw gzip bytes")
        peer.close()

    server = await serve(script)
    assert (await fetch(pool, server.url())).body == b"raw gzip bytes"


async def test_a_connect_timeout_is_its_own_error(pool: Pool) -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connect hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.1)
        try:
            conn = await pool.request("GET", origin_of(f"http://127.0.0.1:{port}"), "/", CIMultiDict(), None,
                                      connect_timeout_seconds=0.3, first_byte_timeout_seconds=LIMIT)  # fmt: skip
        except ConnectTimeout as exc:
            assert "timed out connecting" in str(exc)
        except FirstByteTimeout:
            pytest.fail("a connect timeout must not read as a first-byte timeout")
        else:
            pool.release(conn)
            pytest.skip("this kernel completed the connection despite the full accept queue")
    finally:
        for sock in [listener, *fillers]:
            sock.close()


def test_a_tls_failure_is_named_by_its_tls_reason_not_an_os_errno() -> None:
    from proxy.transport.pool import _os_reason

    reason = _os_reason(ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"))
    assert "certificate verify failed" in reason and "not permitted" not in reason
