"""Slow, stuck and idle clients (issue 13, rows 4 and 5): a client that stops reading is
cut after `client_write_seconds` and its upstream call cancelled; half-sent heads, idle
keep-alives and connection floods are closed or refused so that normal requests are
still served. Timeouts are small here; the bounds asserted are generous (no timing
assertions beyond "eventually closed")."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import orjson
import pytest
from helpers import start_upstream

from proxy.config import config_from_dict
from proxy.errors import ConfigError
from tests.faults.support import CHAT, assert_conserved, check_still_serves, completion_body, settled, start, until
from tests.faults.test_client_faults import BIG_EVENT, completion, streaming

GENEROUS_SECONDS = 10.0


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = GENEROUS_SECONDS) -> bytes:
    """Read until the proxy closes the connection; return what it sent."""
    data = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            try:
                part = await reader.read(65_536)
            except ConnectionError:
                break
            if not part:
                break
            data += part
    return bytes(data)


async def raw_connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def request_bytes(path: str = "/v1/completions") -> bytes:
    body = orjson.dumps({"model": "m", "prompt": "x"})
    head = f"POST {path} HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def metric_value(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or line.startswith(name + labels + "{") and not labels:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not exposed")


async def scrape(proxy: Any) -> str:
    async with proxy.session.get(f"http://127.0.0.1:{proxy.service.admin_port}/metrics") as response:
        return await response.text()


# -- row 4: a client that reads the headers and then nothing ----------------------------


async def test_a_client_that_stops_reading_is_cut_and_its_upstream_call_cancelled() -> None:
    state: dict[str, float] = {}
    runner, url = await start_upstream({CHAT: streaming([BIG_EVENT] * 1024, state=state)})  # 16 MB
    proxy = await start(url, server={"client_write_seconds": 0.5})
    try:
        headers = {"X-Request-Id": "req-stuck-reader"}
        response = await proxy.session.post(proxy.base + CHAT, json={"model": "m", "stream": True}, headers=headers)
        assert response.status == 200
        await response.content.read(65_536)
        # ... and then nothing, while staying connected.
        await until(lambda: "cut_at" in state, GENEROUS_SECONDS, "the upstream stream to be cancelled")
        assert "finished_at" not in state
        proxy.request_ids.append("req-stuck-reader")
        await check_still_serves(proxy, payload={"model": "m", "stream": True})
        receipts = await settled(proxy, proxy.request_ids)
        stuck = receipts["req-stuck-reader"]
        assert stuck.outcome == "client_stalled"
        assert stuck.energy_joules > 0  # the partial work is accounted
        assert_conserved(proxy, receipts)
        response.close()
    finally:
        await proxy.close()
        await runner.cleanup()


async def test_a_slow_but_steady_reader_is_not_cut() -> None:
    events = [BIG_EVENT] * 256  # 4 MB
    runner, url = await start_upstream({CHAT: streaming(events)})
    proxy = await start(url, server={"client_write_seconds": 0.5})
    try:
        async with proxy.session.post(proxy.base + CHAT, json={"model": "m", "stream": True}) as response:
            body = bytearray()
            while part := await response.content.read(262_144):
                body += part
                await asyncio.sleep(0.05)  # each pause well below client_write_seconds
        assert bytes(body).startswith(b"".join(events)) and b"data: [DONE]" in body
    finally:
        await proxy.close()
        await runner.cleanup()


# -- row 5: slowloris, idle keep-alive, connection floods -------------------------------


async def test_half_a_request_head_is_closed_after_header_read_seconds() -> None:
    runner, url = await start_upstream({"/v1/completions": completion})
    proxy = await start(url, server={"header_read_seconds": 0.3, "keepalive_seconds": 60})
    try:
        reader, writer = await raw_connect(proxy.service.public_port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: proxy\r\nContent-Le")
        await writer.drain()
        assert await closed_by_peer(reader) == b""
        writer.close()
        assert proxy.service.connections.closed["header_timeout"] == 1
        await check_still_serves(proxy, "/v1/completions", {"model": "m", "prompt": "x"})
    finally:
        await proxy.close()
        await runner.cleanup()


async def test_a_head_trickled_byte_by_byte_is_closed_however_slowly_it_comes() -> None:
    runner, url = await start_upstream({"/v1/completions": completion})
    proxy = await start(url, server={"header_read_seconds": 0.5, "keepalive_seconds": 60})
    try:
        reader, writer = await raw_connect(proxy.service.public_port)
        head = b"POST /v1/completions HTTP/1.1\r\nHost: proxy\r\n" + b"X-Pad: " + b"a" * 10_000
        deadline = time.monotonic() + GENEROUS_SECONDS
        closed = False
        for byte in head:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            if reader.at_eof() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
            if reader._buffer or reader.at_eof():  # noqa: SLF001 - did the proxy answer or close?
                break
        if not closed:
            await closed_by_peer(reader)
        writer.close()
        assert proxy.service.connections.closed["header_timeout"] == 1
    finally:
        await proxy.close()
        await runner.cleanup()


async def test_an_idle_keep_alive_connection_is_closed_after_keepalive_seconds() -> None:
    runner, url = await start_upstream({"/v1/completions": completion})
    proxy = await start(url, server={"keepalive_seconds": 0.3})
    try:
        reader, writer = await raw_connect(proxy.service.public_port)
        writer.write(request_bytes())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        assert await reader.readexactly(length) == completion_body()
        # The response was complete and keep-alive: now idle, the proxy must close it.
        assert await closed_by_peer(reader) == b""
        writer.close()
        assert proxy.service.connections.closed["keepalive_timeout"] >= 1
    finally:
        await proxy.close()
        await runner.cleanup()


async def test_a_flood_of_idle_sockets_beyond_max_connections_does_not_stop_a_normal_request() -> None:
    cap, extra = 8, 12
    runner, url = await start_upstream({"/v1/completions": completion})
    proxy = await start(url, server={"max_connections": cap, "keepalive_seconds": 60, "header_read_seconds": 60})
    sockets: list[asyncio.StreamWriter] = []
    try:
        for _ in range(cap + extra):  # connect and send nothing
            _, writer = await raw_connect(proxy.service.public_port)
            sockets.append(writer)
        await until(lambda: proxy.service.connections.open <= cap, GENEROUS_SECONDS, "the cap to hold")
        for _ in range(3):
            async with aiohttp.ClientSession() as fresh:  # a new connection each time
                async with fresh.post(proxy.base + "/v1/completions", json={"model": "m", "prompt": "x"}) as response:
                    assert response.status == 200
                    assert await response.read() == completion_body()
        assert proxy.service.connections.open <= cap
        text = await scrape(proxy)
        assert metric_value(text, "carbon_proxy_client_connections_closed_total", '{reason="evicted_idle"}') >= extra
        assert metric_value(text, "carbon_proxy_client_max_connections") == cap
    finally:
        for writer in sockets:
            writer.close()
        await proxy.close()
        await runner.cleanup()


async def test_when_every_connection_is_busy_a_new_one_gets_a_clear_503_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    cap = 4
    runner, url = await start_upstream({"/v1/completions": completion})
    proxy = await start(url, server={"max_connections": cap, "keepalive_seconds": 60, "header_read_seconds": 1.0})
    sockets: list[asyncio.StreamWriter] = []
    caplog.set_level(logging.WARNING, logger="carbon_proxy.server")
    try:
        for _ in range(cap):  # each has begun a request head: busy, not idle
            _, writer = await raw_connect(proxy.service.public_port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            sockets.append(writer)
        await until(lambda: proxy.service.connections.open == cap, GENEROUS_SECONDS, "the busy connections")
        await asyncio.sleep(0.05)  # let the partial heads reach the proxy
        refusals = []
        for _ in range(5):
            reader, writer = await raw_connect(proxy.service.public_port)
            refusals.append(await closed_by_peer(reader))
            writer.close()
        for answer in refusals:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), answer
            assert orjson.loads(body)["error"]["type"] == "too_many_connections"
        cap_lines = [r for r in caplog.records if "max_connections" in r.getMessage()]
        assert len(cap_lines) == 1, [r.getMessage() for r in cap_lines]  # rate-limited
        assert proxy.service.connections.closed["refused"] == 5
        # The half-sent heads time out; then service resumes.
        await until(lambda: proxy.service.connections.open == 0, GENEROUS_SECONDS, "the slow heads to be closed")
        await check_still_serves(proxy, "/v1/completions", {"model": "m", "prompt": "x"})
    finally:
        for writer in sockets:
            writer.close()
        await proxy.close()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("client_write_seconds", 0),
        ("client_write_seconds", "30"),
        ("keepalive_seconds", -1),
        ("header_read_seconds", float("inf")),
        ("max_connections", -1),
        ("max_connections", 1.5),
        ("max_connections", True),
    ],
)
def test_bad_limits_are_config_errors_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"server": {key: value}, "upstreams": [{"name": "a", "url": "http://127.0.0.1:1"}]})
    assert caught.value.key == f"server.{key}"
