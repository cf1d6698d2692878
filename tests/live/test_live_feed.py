"""The live page's server side: routes only on the admin listener, the event stream
carries settled requests (non-secret fields only), slow clients are dropped, shutdown
ends open streams, and the hour's rates add up."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from helpers import FakeMeter, start_proxy, start_upstream
from proxy.live.feed import CLIENT_QUEUE_EVENTS, MAX_CLIENTS, LiveFeed, sse
from proxy.live.routes import FEED_KEY
from proxy.live.window import HourWindow
from proxy.serve import Service
from proxy.tenants import credential_hash

TIMEOUT = aiohttp.ClientTimeout(total=30)


async def chat(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        }
    )


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    runner, url = await start_upstream({"/v1/chat/completions": chat, "/{tail:.*}": chat})
    svc = await start_proxy(url, meter=FakeMeter(watts=300.0), tenants={"header": "X-Tenant-Id", "allow": ["team-a"]})
    try:
        yield svc
    finally:
        await asyncio.wait_for(svc.stop(), 20)
        await runner.cleanup()


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """Parse a text/event-stream into (event, data) pairs."""
    event, data = "message", b""
    async for line in response.content:
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield event, orjson.loads(data)
            event, data = "message", b""
        elif line.startswith(b"event: "):
            event = line[7:].decode()
        elif line.startswith(b"data: "):
            data += line[6:]


async def send(session: aiohttp.ClientSession, service: Service, headers: dict[str, str]) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    url = f"http://127.0.0.1:{service.public_port}/v1/chat/completions"
    async with session.post(url, json=body, headers=headers, timeout=TIMEOUT) as response:
        assert response.status == 200
        await response.read()
        return response.headers["X-Carbon-Receipt-Id"]


async def test_page_and_assets_are_served_on_the_admin_listener_only(service: Service) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{service.admin_port}/", timeout=TIMEOUT) as response:
            assert response.status == 200 and response.content_type == "text/html"
            page = await response.text()
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        for asset in ("/live/app.js", "/live/style.css", "/live/favicon.svg"):
            assert asset in page
            async with session.get(f"http://127.0.0.1:{service.admin_port}{asset}", timeout=TIMEOUT) as response:
                assert response.status == 200 and len(await response.read()) > 0
        assert "//" not in page.replace("http://www.w3.org", ""), "no third-party (CDN) URL in the page"
        # The public port forwards / to the model server: never the page, never the stream.
        for path in ("/", "/live/events", "/live/app.js"):
            async with session.get(f"http://127.0.0.1:{service.public_port}{path}", timeout=TIMEOUT) as response:
                assert b"carbon-proxy" not in await response.read()


async def test_stream_pushes_settled_requests_without_secrets(service: Service) -> None:
    secret = "sk-very-secret-key"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{service.admin_port}/live/events", timeout=TIMEOUT) as stream:
            assert stream.headers["Content-Type"] == "text/event-stream"
            seen = events(stream)
            name, hello = await anext(seen)
            assert name == "hello" and hello["requests"] == [] and hello["state"]["meter"]["kind"] == "fake"
            first = await send(session, service, {"X-Tenant-Id": "team-a"})
            second = await send(session, service, {"Authorization": f"Bearer {secret}"})
            rows: dict[str, dict[str, Any]] = {}
            raw: list[str] = []
            async with asyncio.timeout(20):
                while not all(rows.get(i, {}).get("status") == "final" for i in (first, second)):
                    name, data = await anext(seen)
                    raw.append(orjson.dumps(data).decode())
                    if name == "requests":
                        rows.update((row["id"], row) for row in data["requests"])
                        hour = data["hour"]
    text = "".join(raw)
    assert secret not in text and credential_hash(secret)[:12] not in text, "no credential or its hash on the page"
    assert rows[first]["tenant"] == "team-a"
    assert rows[second]["tenant"] == "other", "an unlisted tenant is folded as in the metrics"
    for request_id in (first, second):
        receipt = await service.proxy.receipts.get(request_id)
        assert receipt is not None and receipt.status == "final"
        row = rows[request_id]
        assert row["energy_joules"] == pytest.approx(receipt.energy_joules)
        assert row["co2e_grams"] == pytest.approx(receipt.co2e_grams)
        assert (row["prompt_tokens"], row["output_tokens"], row["model"]) == (11, 7, "m")
    assert hour["requests"] >= 1 and hour["co2e_grams"] > 0


async def test_a_new_page_starts_from_the_latest_rows(service: Service) -> None:
    async with aiohttp.ClientSession() as session:
        request_id = await send(session, service, {})
        async with session.get(f"http://127.0.0.1:{service.admin_port}/live/events", timeout=TIMEOUT) as stream:
            name, hello = await anext(events(stream))
    assert name == "hello"
    assert [row["id"] for row in hello["requests"]] == [request_id]


async def test_a_slow_client_is_dropped_and_the_others_keep_their_events() -> None:
    class Proxy:  # only what LiveFeed reads at construction
        class tenancy:
            label = staticmethod(lambda tenant: tenant)

        listeners: list[Any] = []

        def on_record(self, listener: Any) -> None:
            self.listeners.append(listener)

    feed = LiveFeed(Proxy())  # type: ignore[arg-type]
    slow, fast = feed.subscribe(), feed.subscribe()
    assert slow is not None and fast is not None
    for i in range(CLIENT_QUEUE_EVENTS + 5):
        feed._broadcast(sse("requests", {"n": i}))
        fast.queue.get_nowait()  # the fast one keeps up
    assert slow not in feed.clients and fast in feed.clients
    assert slow.queue.get_nowait() is None, "the dropped client's handler wakes and ends its stream"
    assert feed.dropped_clients == 1
    await feed.close()


async def test_open_pages_are_capped(service: Service) -> None:
    feed = service._admin.app[FEED_KEY]  # type: ignore[union-attr]
    held = [feed.subscribe() for _ in range(MAX_CLIENTS - len(feed.clients))]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{service.admin_port}/live/events", timeout=TIMEOUT) as response:
                assert response.status == 503
                assert (await response.json())["error"]["type"] == "unavailable"
    finally:
        for client in held:
            if client is not None:
                feed.unsubscribe(client)


async def test_stopping_the_service_ends_open_streams() -> None:
    runner, url = await start_upstream({"/{tail:.*}": chat})
    service = await start_proxy(url, meter=FakeMeter())
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{service.admin_port}/live/events", timeout=TIMEOUT) as stream:
                await anext(events(stream))
                # aiohttp would wait up to its 60 s shutdown timeout for a handler still streaming.
                await asyncio.wait_for(service.stop(), 20)
                await asyncio.wait_for(stream.content.read(), 10)  # returns at the end of the stream
                assert stream.content.at_eof(), "the stream ends with the service"
    finally:
        await runner.cleanup()


def test_hour_window_rates_and_expiry() -> None:
    start = 1_000_000.0 * 60
    window = HourWindow(started_unix=start)
    window.add(start + 10, energy_joules=100.0, co2e_grams=0.02, tokens=1000)
    window.add(start + 70, energy_joules=300.0, co2e_grams=0.04, tokens=1000)
    young = window.summary(now_unix=start + 600)  # ten minutes up: rates scale from what it saw
    assert young["requests"] == 2 and young["co2e_grams"] == pytest.approx(0.06)
    assert young["grams_per_hour"] == pytest.approx(0.06 * 6)
    assert young["grams_per_1k_tokens"] == pytest.approx(0.03)
    minutes = young["grams_per_minute"]
    assert len(minutes) == 60 and minutes[-11] == pytest.approx(0.02) and minutes[-10] == pytest.approx(0.04)
    later = window.summary(now_unix=start + 3600 + 30)  # the first request's minute has left the hour
    assert later["requests"] == 1 and later["grams_per_hour"] == pytest.approx(0.04)
    assert window.summary(now_unix=start + 3 * 3600)["grams_per_1k_tokens"] is None


def test_power_per_group_is_the_rate_of_the_engines_counters() -> None:
    from types import SimpleNamespace

    from proxy.attribution.engine import GroupTotals
    from proxy.config import config_from_dict
    from proxy.live.state import MIN_RATE_SECONDS, PowerTracker

    totals = {"0": GroupTotals()}
    engine = SimpleNamespace(
        totals=lambda: totals,
        group_devices=lambda group: ("0",),
        last_power_watts=lambda group: 250.0,
        idle_power_watts=lambda group: 50.0,
        in_flight=lambda group: 1,
    )
    config = config_from_dict({"upstreams": [{"name": "llm", "url": "http://127.0.0.1:8000", "devices": ["0"]}]})
    proxy = SimpleNamespace(accountant=SimpleNamespace(engine=engine), config=config)
    tracker = PowerTracker(window_seconds=30.0)
    (first,) = tracker.update(proxy, now=100.0)  # type: ignore[arg-type]
    assert first["measured_watts"] is None, "no rate without history"
    # 10 s later: 2000 J measured, 1500 J given to requests, 400 J idle (100 J still settling).
    totals["0"] = GroupTotals(measured_joules=2000.0, attributed_joules=1500.0, idle_joules=400.0)
    (group,) = tracker.update(proxy, now=100.0 + max(10.0, MIN_RATE_SECONDS))  # type: ignore[arg-type]
    assert group["group"] == "0" and group["upstreams"] == ["llm"]
    assert group["measured_watts"] == pytest.approx(200.0)
    assert group["attributed_watts"] == pytest.approx(150.0)
    assert group["idle_watts"] == pytest.approx(40.0)
    assert group["power_watts_now"] == 250.0 and group["idle_power_watts"] == 50.0


async def test_a_page_that_stops_reading_is_cut_off_and_memory_stays_bounded(service: Service) -> None:
    """A real connection whose peer never reads: its socket buffers fill, the handler
    blocks in write, its queue fills, and the broadcaster drops it and aborts the
    connection, while a page that reads keeps getting every event."""
    feed = service._admin.app[FEED_KEY]  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection("127.0.0.1", service.admin_port)
    writer.write(b"GET /live/events HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        while not feed.clients:
            await asyncio.sleep(0.01)
    (stalled,) = feed.clients
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{service.admin_port}/live/events", timeout=TIMEOUT) as stream:
            pages = events(stream)
            await anext(pages)  # hello
            big = "x" * 256 * 1024
            received = 0
            async with asyncio.timeout(60):
                for i in range(400):  # up to 100 MiB offered: far beyond any socket buffer
                    feed._broadcast(sse("requests", {"n": i, "pad": big}))
                    while True:  # the reading page takes each event before the next
                        name, data = await anext(pages)
                        if name == "requests" and data.get("n") == i:
                            received += 1
                            break
                    if stalled not in feed.clients:
                        break
    assert stalled not in feed.clients and feed.dropped_clients == 1
    assert received == i + 1, "the page that reads missed nothing"
    assert stalled.queue.qsize() <= 1, "a dropped page holds no events"
    # Its connection was aborted: reading what is left ends in EOF or a reset.
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):
            while await reader.read(1 << 20):
                pass
    writer.close()
