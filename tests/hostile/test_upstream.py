"""A misbehaving upstream (issue 13 row 7 and item 2): a stream event without end, endless
headers, garbage, a wrong Content-Length, a close mid-chunk. The client gets every byte
the upstream sent or a clean JSON error; the proxy holds at most `max_event_bytes` of one
event; after each, it serves the next request, its receipts reach the database and
nothing leaked."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dialects import dialect_for
from proxy.dialects.base import RequestInfo

from .support import CHAT, HostileProxy, RawUpstream, Recorder, completion_body, rss_bytes, start_hostile_proxy, until

ATTACK = {"X-Attack": "yes"}
CHUNK = 64 * 1024
MIB = 1024 * 1024

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def normal_answer() -> bytes:
    body = completion_body()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Misbehaving(RawUpstream):
    """Answers requests carrying `X-Attack: yes` with `attack`, every other one properly
    (so the after-attack check runs against the same upstream)."""

    def __init__(self, attack: Answer) -> None:
        self.attack = attack

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if b"x-attack: yes" in self.requests[-1].lower():
                await self.attack(reader, writer)
            else:
                writer.write(normal_answer())
                await writer.drain()

        super().__init__(answer)


@pytest.fixture
async def misbehaving(tmp_path: Path) -> AsyncIterator[Callable[[Answer], Awaitable[HostileProxy]]]:
    started: list[tuple[HostileProxy, Misbehaving]] = []

    async def start(attack: Answer, **overrides: object) -> HostileProxy:
        upstream = Misbehaving(attack)
        url = await upstream.start()
        proxy = await start_hostile_proxy(tmp_path, url, Recorder(), **overrides)  # type: ignore[arg-type]
        started.append((proxy, upstream))
        return proxy

    yield start
    for proxy, upstream in started:
        await proxy.close()
        await upstream.close()


async def read_all(proxy: HostileProxy, payload: dict[str, object]) -> tuple[int, bytes, str]:
    """Status, the whole body (hashed as it streams, so the test holds none of it), its
    sha256 and, for small bodies, the bytes."""
    digest = hashlib.sha256()
    head = bytearray()
    async with proxy.session.post(proxy.base + CHAT, json=payload, headers=ATTACK) as response:
        try:
            async for chunk in response.content.iter_chunked(CHUNK):
                digest.update(chunk)
                if len(head) < 4096:
                    head += chunk[: 4096 - len(head)]
        except aiohttp.ClientPayloadError:
            pass  # a stream the upstream broke: the proxy cuts it too
        return response.status, bytes(head), digest.hexdigest()


def sse_head() -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


EVENTS = b"".join(b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % i for i in range(3))


async def test_an_sse_event_without_end_passes_through_unbuffered_and_flagged(misbehaving: Callable[..., Awaitable[HostileProxy]]) -> None:
    """Row 7: a 32 MiB line without terminator used to be held whole (RSS +240 MB for
    50 MB, copied on every read). Now the proxy holds at most max_event_bytes of it, the
    client gets every byte unchanged and in order, and the receipt says the counts stop."""
    sent = hashlib.sha256()
    growth: list[int] = []

    async def huge_event(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(sse_head())
        writer.write(EVENTS)
        sent.update(EVENTS)
        block = b"data: " + b"x" * (CHUNK - 6)
        before = rss_bytes()
        for i in range(32 * MIB // CHUNK):
            part = block if i == 0 else b"x" * CHUNK
            writer.write(part)
            sent.update(part)
            await writer.drain()
            if i % 64 == 63:
                growth.append(rss_bytes() - before)
        writer.write(b"\n\n" + EVENTS + b"data: [DONE]\n\n")  # it ends, late: still passed through as is
        sent.update(b"\n\n" + EVENTS + b"data: [DONE]\n\n")
        await writer.drain()

    proxy = await misbehaving(huge_event)
    status, head, digest = await read_all(proxy, {"model": "m", "stream": True, "messages": []})
    assert status == 200
    assert max(growth) < 12 * MIB, [g // MIB for g in growth]  # a buffered event would hold all 32 MiB
    assert digest == sent.hexdigest()  # every byte, unchanged, in order (no figures glued on)
    await until(lambda: any(row is not None for row in [_last_row(proxy)]), 5.0, "the receipt")
    row = _last_row(proxy)
    assert row is not None and "tokens=estimated" in row["basis"] and row["output_tokens"] == 3
    await proxy.after_attack()


def _last_row(proxy: HostileProxy) -> dict[str, object] | None:
    import sqlite3

    conn = sqlite3.connect(f"file:{proxy.db_path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM receipts WHERE dialect = 'openai' AND basis LIKE '%tokens=estimated%'").fetchone()
    finally:
        conn.close()
    return dict(row) if row is not None else None


async def test_the_event_cap_is_configurable(misbehaving: Callable[..., Awaitable[HostileProxy]]) -> None:
    """An event just over a small cap is passed through unread; a smaller one is read."""
    big = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"y" * 8000 + b'"}}]}\n\n'

    async def events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(sse_head() + EVENTS)
        await writer.drain()
        for i in range(0, len(big), 1000):  # dribbled, so it is held across reads
            writer.write(big[i : i + 1000])
            await writer.drain()
            await asyncio.sleep(0.01)  # separate reads at the proxy
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()

    proxy = await misbehaving(events, server={"max_event_bytes": 4096})
    status, head, _ = await read_all(proxy, {"model": "m", "stream": True, "messages": []})
    assert status == 200 and head.startswith(EVENTS)
    await until(lambda: _last_row(proxy) is not None, 5.0, "the flagged receipt")
    await proxy.after_attack()


async def test_an_ndjson_line_without_end_passes_through(misbehaving: Callable[..., Awaitable[HostileProxy]]) -> None:
    lines = b'{"message":{"content":"a"},"done":false}\n' * 2
    sent = hashlib.sha256()

    async def huge_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n" + lines)
        sent.update(lines)
        for _ in range(3 * MIB // CHUNK):
            writer.write(b"z" * CHUNK)
            sent.update(b"z" * CHUNK)
            await writer.drain()
        tail = b'\n{"done":true,"eval_count":9}\n'
        writer.write(tail)
        sent.update(tail)
        await writer.drain()

    proxy = await misbehaving(huge_line, dialect="ollama")
    digest = hashlib.sha256()
    async with proxy.session.post(proxy.base + "/api/chat", json={"model": "m"}, headers=ATTACK) as response:
        assert response.status == 200
        async for chunk in response.content.iter_chunked(CHUNK):
            digest.update(chunk)
    assert digest.hexdigest() == sent.hexdigest()
    await proxy.after_attack()


# -- below HTTP: endless headers, garbage, wrong lengths, a close mid-chunk ---------------


async def endless_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(20_000):
        writer.write(b"X-Filler-%d: %s\r\n" % (i, b"f" * 100))
        await writer.drain()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(bytes(range(256)) * 64)
    await writer.drain()


async def short_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + completion_body())
    await writer.drain()


async def long_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    body = completion_body()
    # Content-Length smaller than what follows: the extra bytes must not become the next
    # response of a pooled connection.
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%sHTTP/1.1 418 Surprise\r\n\r\n" % (len(body), body))
    await writer.drain()
    await asyncio.sleep(0.2)


async def close_mid_chunk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"%x\r\n%s\r\n" % (len(EVENTS), EVENTS))
    writer.write(b"400\r\ndata: {\"choices\"")  # announces 1 KiB, sends 17 bytes, closes
    await writer.drain()


async def bad_chunk_size(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnope\r\n0\r\n\r\n")
    await writer.drain()


async def non_utf8_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    body = completion_body()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Odd: caf\xe9\xff\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()


@pytest.mark.parametrize(
    ("attack", "statuses"),
    [
        (endless_headers, {502}),
        (garbage, {502}),
        (short_body, {502}),
        (long_body, {200}),
        (close_mid_chunk, {200}),
        (bad_chunk_size, {502}),
        (non_utf8_header, {200}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
async def test_a_misbehaving_upstream_gets_a_clean_answer(
    misbehaving: Callable[..., Awaitable[HostileProxy]], attack: Answer, statuses: set[int], caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await misbehaving(attack)
    for payload in ({"model": "m", "messages": []}, {"model": "m", "stream": True, "messages": []}):
        status, head, _ = await read_all(proxy, payload)
        assert status in statuses, head
        if status >= 500:
            assert orjson.loads(head)["error"]["code"] == status
        await proxy.after_attack()
    for record in caplog.records:  # an upstream's bytes are no reason for a traceback
        assert record.exc_info is None, (record.name, record.getMessage())


# -- the reader alone: any split of any stream with an over-long event ---------------------


@settings(max_examples=60, deadline=None)
@given(
    before=st.integers(0, 3),
    size=st.integers(120, 400),
    after=st.integers(0, 3),
    terminated=st.booleans(),
    cuts=st.lists(st.integers(1, 50), min_size=1, max_size=40),
    dialect=st.sampled_from([("openai", CHAT), ("generic", "/x"), ("tgi", "/generate_stream"), ("llamacpp", "/completion")]),
)
def test_readers_pass_an_over_long_event_through_and_hold_no_more_than_the_cap(
    before: int, size: int, after: int, terminated: bool, cuts: list[int], dialect: tuple[str, str]
) -> None:
    event = lambda i: b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % i  # noqa: E731
    huge = b"data: " + b"q" * size + (b"\n\n" if terminated else b"")
    stream = b"".join(event(i) for i in range(before)) + huge + b"".join(event(i) for i in range(after))
    stream += b"data: [DONE]\n\n"
    reader = dialect_for(*dialect).reader(RequestInfo(stream=True, client_wants_usage=True), "text/event-stream", lambda n, t: None)
    reader.max_event_bytes = 64
    out = []
    at = 0
    while at < len(stream):  # reads of at most 50 bytes: an event over 114 cannot come whole
        for cut in cuts:
            out.append(reader.feed(stream[at : at + cut], 0.0))
            at += cut
            assert len(reader._pending) <= 64  # type: ignore[attr-defined]
    reader.end()
    out.append(reader.tail(None))
    assert b"".join(out) == stream
    assert reader.work.unparsed and reader.work.streamed_tokens <= before


@pytest.mark.parametrize("value", [100, 0, -1, "1MiB", True, float("inf")])
def test_the_event_cap_is_validated(value: object) -> None:
    from helpers import proxy_config

    from proxy.config import config_from_dict
    from proxy.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        config_from_dict(proxy_config("http://127.0.0.1:1", server={"max_event_bytes": value}))
    assert error.value.key == "server.max_event_bytes"
    assert config_from_dict(proxy_config("http://127.0.0.1:1")).server.max_event_bytes == 1024 * 1024
