"""Client faults: slow readers, clients that vanish while the upstream thinks, mid-upload,
mid-stream (many at once, at random points) and while the proxy is blocked on a full
socket. After each: the upstream call is cancelled, the partial work is accounted once
with outcome `client_disconnected`, the proxy serves the next request, and request
energy + idle == measured.

(One client leaving an endless stream: tests/proxy/test_faults.py.)
"""

from __future__ import annotations

import asyncio
import random
import time

from aiohttp import web
from helpers import start_upstream

from .support import CHAT, assert_conserved, by_request_id, check_still_serves, completion_body, post, settled, sse_event, start, until

BIG_EVENT = b"data: " + b'{"choices":[{"index":0,"delta":{"content":"' + b"x" * 16_000 + b'"}}]}\n\n'


async def completion(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=completion_body(), content_type="application/json")


def streaming(events: list[bytes], pause: float = 0.0, state: dict | None = None):
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for event in events:
                await response.write(event)
                if pause:
                    await asyncio.sleep(pause)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            if state is not None:
                state["cut_at"] = time.monotonic()
            raise
        if state is not None:
            state["finished_at"] = time.monotonic()
        return response

    return handler


async def test_a_slow_reader_gets_every_byte_and_holds_up_no_one_else() -> None:
    events = [BIG_EVENT] * 256  # 4 MB: far more than the socket buffers hold
    runner, url = await start_upstream({CHAT: streaming(events), "/v1/completions": completion})
    proxy = await start(url)
    try:
        received = bytearray()

        async def slow() -> None:
            headers = {"X-Request-Id": "req-slow"}
            async with proxy.session.post(proxy.base + CHAT, json={"model": "m", "stream": True}, headers=headers) as response:
                proxy.request_ids.append("req-slow")
                while True:
                    part = await response.content.read(32_768)
                    if not part:
                        break
                    received.extend(part)
                    await asyncio.sleep(0.002)

        reader = asyncio.create_task(slow())
        await until(lambda: len(received) > 100_000, 5, "the slow stream to start")
        for _ in range(5):  # meanwhile, others are served at once
            started = time.monotonic()
            status, _, _ = await post(proxy, "/v1/completions", {"model": "m", "prompt": "x"})
            assert status == 200 and time.monotonic() - started < 0.5
        assert not reader.done(), "the slow reader should still be reading"
        await asyncio.wait_for(reader, 20)
        body = bytes(received)
        assert body.startswith(b"".join(events))
        rest = body[len(b"".join(events)) :]
        assert rest.startswith(b": emissions {") and rest.endswith(b"\n\ndata: [DONE]\n\n")
        receipts = await settled(proxy, proxy.request_ids)
        assert receipts["req-slow"].outcome == "ok" and receipts["req-slow"].output_tokens == 256
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await runner.cleanup()


async def test_client_gone_while_the_upstream_thinks_cancels_the_upstream_call() -> None:
    noticed: dict[str, float] = {}

    async def thinking(request: web.Request) -> web.Response:
        await request.read()
        for _ in range(500):  # up to 5 s
            if request.transport is None or request.transport.is_closing():
                noticed["at"] = time.monotonic()
                break
            await asyncio.sleep(0.01)
        return web.Response(body=completion_body(), content_type="application/json")

    runner, url = await start_upstream({CHAT: thinking, "/v1/completions": completion})
    proxy = await start(url)
    try:
        proxy.request_ids.append("req-gone")
        try:
            await asyncio.wait_for(proxy.session.post(proxy.base + CHAT, json={"model": "m"}, headers={"X-Request-Id": "req-gone"}), 0.3)
        except TimeoutError:
            gone_at = time.monotonic()
        await until(lambda: "at" in noticed, 2, "the upstream to see its call cancelled")
        assert noticed["at"] - gone_at < 1.0
        await check_still_serves(proxy, "/v1/completions")
        receipts = await settled(proxy, proxy.request_ids)
        gone = receipts["req-gone"]
        assert gone.outcome == "client_disconnected" and gone.energy_joules > 0
        assert gone.duration_seconds < 1.0  # closed when the client left, not when the upstream answered
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await runner.cleanup()


async def upload_and_vanish(port: int, request_id: str, declared: int, sent: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {declared}\r\nX-Request-Id: {request_id}\r\n\r\n"
    )
    writer.write(head.encode())
    block = b"u" * 65_536
    for _ in range(sent // len(block)):
        writer.write(block)
        await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()


async def test_client_gone_mid_upload_reaches_the_upstream_only_when_streamed_and_is_accounted_once() -> None:
    seen: list[str] = []
    completed: list[str] = []

    async def upload(request: web.Request) -> web.Response:
        seen.append(request.headers["X-Request-Id"])
        await request.read()
        completed.append(request.headers["X-Request-Id"])
        return web.json_response({"ok": True})

    runner, url = await start_upstream({"/upload": upload, CHAT: completion})
    proxy = await start(url, dialect="generic")
    try:
        # A small body is read whole before the upstream is called: nothing to cancel.
        await upload_and_vanish(proxy.service.public_port, "req-small", declared=1_000_000, sent=262_144)
        # A large one (over 4 MB) streams to the upstream as it arrives.
        await upload_and_vanish(proxy.service.public_port, "req-large", declared=8 * 1024 * 1024, sent=2 * 1024 * 1024)
        await until(lambda: "req-large" in seen, 2, "the large upload to reach the upstream")
        await asyncio.sleep(0.2)
        assert completed == [] and "req-small" not in seen  # no truncated body passed for whole
        await check_still_serves(proxy)
        proxy.request_ids.append("req-large")
        receipts = await settled(proxy, proxy.request_ids)
        assert receipts["req-large"].outcome == "client_disconnected"
        assert await by_request_id(proxy.store, "req-small") is None  # it never reached a model
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await runner.cleanup()


async def test_many_clients_vanishing_at_random_points_are_each_accounted_once() -> None:
    events = [sse_event(i) for i in range(20)]
    runner, url = await start_upstream({CHAT: streaming(events, pause=0.01)})
    proxy = await start(url)
    rng = random.Random(8)
    plan = {f"req-{i:02d}": rng.randint(0, 26) for i in range(30)}  # events to read; >= 21: all

    async def client(request_id: str, keep: int) -> str:
        response = await proxy.session.post(proxy.base + CHAT, json={"model": "m", "stream": True}, headers={"X-Request-Id": request_id})
        try:
            if keep > len(events):
                body = await response.read()
                assert body.endswith(b"data: [DONE]\n\n") and b": emissions {" in body
                return "ok"
            for _ in range(keep):
                await response.content.readuntil(b"\n\n")
            return "client_disconnected"
        finally:
            response.close()  # for the others: the client goes away mid-stream

    try:
        expected = dict(zip(plan, await asyncio.gather(*(client(rid, keep) for rid, keep in plan.items()))))
        await check_still_serves(proxy, payload={"model": "m", "stream": True})
        receipts = await settled(proxy, [*plan, *proxy.request_ids])
        assert {rid: receipts[rid].outcome for rid in plan} == expected
        for rid, keep in plan.items():
            assert receipts[rid].energy_joules > 0
            if keep <= len(events):
                assert receipts[rid].output_tokens is not None and receipts[rid].output_tokens >= keep
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await runner.cleanup()


async def test_client_gone_while_the_proxy_waits_on_its_full_socket() -> None:
    state: dict[str, float] = {}
    runner, url = await start_upstream({CHAT: streaming([BIG_EVENT] * 1024, state=state)})  # 16 MB
    proxy = await start(url)
    try:
        response = await proxy.session.post(proxy.base + CHAT, json={"model": "m", "stream": True}, headers={"X-Request-Id": "req-stuck"})
        await response.content.read(65_536)
        await asyncio.sleep(0.3)  # stop reading: the proxy blocks writing, the upstream on the proxy
        assert "finished_at" not in state, "backpressure: the upstream cannot finish while the client reads nothing"
        response.close()
        closed_at = time.monotonic()
        await until(lambda: "cut_at" in state, 2, "the upstream to see the stream cancelled")
        assert state["cut_at"] - closed_at < 1.0
        proxy.request_ids.append("req-stuck")
        await check_still_serves(proxy, payload={"model": "m", "stream": True})
        receipts = await settled(proxy, proxy.request_ids)
        assert receipts["req-stuck"].outcome == "client_disconnected"
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await runner.cleanup()


async def test_a_client_slower_than_the_idle_timeout_is_not_taken_for_a_silent_upstream() -> None:
    # The upstream answers at once, but the client pauses longer than idle_seconds while
    # the proxy is blocked writing to it: the stream must complete, not be cut as
    # upstream_timeout.
    events = [BIG_EVENT] * 2048  # 32 MB: more than the kernel buffers hold, so the proxy blocks
    runner, url = await start_upstream({CHAT: streaming(events)})
    proxy = await start(url, upstream={"timeouts": {"idle_seconds": 0.3}})
    try:
        headers = {"X-Request-Id": "req-pausing"}
        async with proxy.session.post(proxy.base + CHAT, json={"model": "m", "stream": True}, headers=headers) as response:
            proxy.request_ids.append("req-pausing")
            body = bytearray(await response.content.read(65_536))
            await asyncio.sleep(1.0)  # > 3 x idle_seconds without reading
            body += await response.read()
        assert bytes(body).startswith(b"".join(events)) and body.endswith(b"data: [DONE]\n\n")
        receipts = await settled(proxy, proxy.request_ids)
        assert receipts["req-pausing"].outcome == "ok"
    finally:
        await proxy.close()
        await runner.cleanup()
