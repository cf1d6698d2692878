"""Upstream faults below and at the HTTP layer: resets, half-written chunks, stalls,
garbage, wrong Content-Length. After each: the client sees a clean JSON error (or, once
headers are out, a stream that visibly breaks rather than a clean end that would pass
for a complete answer), the proxy serves the next request, every request has exactly
one receipt and outcome, and request energy + idle energy == measured energy.

(Upstream down, stall before headers and stall mid-stream: tests/proxy/test_faults.py.)
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from .support import (
    CHAT,
    RawUpstream,
    assert_clean_json_error,
    assert_conserved,
    check_still_serves,
    chunk,
    completion_body,
    ok_json,
    ok_sse,
    post,
    response_head,
    settled,
    sse_event,
    start,
)

SSE_HEAD = response_head(headers={"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"})


def scripted(faults: dict[str, list]) -> RawUpstream:
    """Requests with `?fault=NAME` get that script; any other request a good answer."""

    def script(head: bytes, body: bytes) -> list:
        target = head.split(b" ", 2)[1]
        for name, steps in faults.items():
            if target.endswith(b"?fault=" + name.encode()):
                return steps
        # Parsed: the proxy forwards the client's own spacing (`"stream": true`).
        return ok_sse() if body and orjson.loads(body).get("stream") is True else ok_json()

    return RawUpstream(script)


async def read_stream(proxy, fault: str, request_id: str) -> tuple[int, bytes, bool]:
    """(status, bytes received, whether the stream ended cleanly)."""
    headers = {"X-Request-Id": request_id}
    async with proxy.session.post(f"{proxy.base}{CHAT}?fault={fault}", json={"model": "m", "stream": True}, headers=headers) as response:
        proxy.request_ids.append(response.headers["X-Request-Id"])
        received = b""
        try:
            async for part in response.content.iter_any():
                received += part
            return response.status, received, True
        except aiohttp.ClientPayloadError:
            return response.status, received, False


async def test_reset_or_half_written_chunk_mid_stream_breaks_the_client_stream_visibly() -> None:
    upstream = await scripted(
        {
            # Three events, then an RST (SO_LINGER 0): a crashed or killed model server.
            "reset": [SSE_HEAD, chunk(sse_event(0)), chunk(sse_event(1)), chunk(sse_event(2)), 0.05, "reset"],
            # One event, then a chunk header announcing 0x40 bytes, 12 of them, and FIN.
            "half-chunk": [SSE_HEAD, chunk(sse_event(0)), b"40\r\n" + sse_event(1)[:12], 0.05, "close"],
        }
    ).start()
    proxy = await start(upstream.url)
    try:
        for fault, events in (("reset", 3), ("half-chunk", 1)):
            status, received, clean = await read_stream(proxy, fault, f"req-{fault}")
            assert status == 200
            assert not clean, "a broken upstream stream must not end cleanly at the client"
            # Every whole event that arrived was forwarded unchanged; nothing was added.
            assert received == b"".join(sse_event(i) for i in range(events))
            await check_still_serves(proxy)
            await check_still_serves(proxy, payload={"model": "m", "stream": True})
        receipts = await settled(proxy, proxy.request_ids)
        for fault, events in (("reset", 3), ("half-chunk", 1)):
            receipt = receipts[f"req-{fault}"]
            assert receipt.outcome == "upstream_broken" and receipt.status_code == 200
            assert receipt.output_tokens == events  # counted as they passed
            assert receipt.energy_joules > 0
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await upstream.close()


async def test_half_written_event_in_a_cleanly_ended_stream_passes_as_is_without_figures() -> None:
    partial = sse_event(1)[:25]
    upstream = await scripted({"partial": [SSE_HEAD, chunk(sse_event(0)), chunk(partial), b"0\r\n\r\n"]}).start()
    proxy = await start(upstream.url)
    try:
        status, received, clean = await read_stream(proxy, "partial", "req-partial")
        # HTTP framing was complete: the client gets exactly the upstream bytes; no figures
        # follow the unterminated event (a terminator would make clients dispatch it).
        assert status == 200 and clean
        assert received == sse_event(0) + partial
        await check_still_serves(proxy)
        receipts = await settled(proxy, proxy.request_ids)
        assert receipts["req-partial"].outcome == "ok"
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await upstream.close()


async def test_garbage_instead_of_http_is_a_clean_502() -> None:
    garbage = {
        "ssh-banner": [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "close"],
        "bad-header-line": [b"HTTP/1.1 200 OK\r\nthis is not a header\r\n\r\n", "close"],
        "bad-status": [b"HTTP/1.1 two hundred\r\n\r\n", "close"],
        "binary": [bytes(range(256)) * 4, "close"],
        "nothing": ["close"],
        "reset-before-headers": ["reset"],
        "bad-chunk-size": [SSE_HEAD + b"zz\r\nhello\r\n", "close"],
    }
    upstream = await scripted(garbage).start()
    proxy = await start(upstream.url)
    try:
        for fault in garbage:
            status, body, headers = await post(proxy, f"{CHAT}?fault={fault}", {"model": "m"})
            if fault == "bad-chunk-size":
                # Headers were valid (a stream begins), the body is not: a broken stream,
                # or a 502 when the proxy notices before it answers.
                assert status in (200, 502), (fault, status)
            else:
                await assert_clean_json_error(status, body, 502, "upstream_error")
                assert headers["X-Request-Id"]
            await check_still_serves(proxy)
        receipts = await settled(proxy, proxy.request_ids)
        assert sum(r.outcome == "ok" for r in receipts.values()) == len(garbage)  # the good ones in between
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await upstream.close()


async def test_content_length_longer_than_the_body_is_a_clean_502() -> None:
    body = completion_body()
    upstream = await scripted(
        {"long": [response_head(headers={"Content-Type": "application/json", "Content-Length": str(len(body) + 50)}) + body, "close"]}
    ).start()
    proxy = await start(upstream.url)
    try:
        status, received, headers = await post(proxy, f"{CHAT}?fault=long", {"model": "m"}, headers={"X-Request-Id": "req-long"})
        error = await assert_clean_json_error(status, received, 502, "upstream_error")
        assert "mid-response" in error["error"]["message"]
        await check_still_serves(proxy)
        receipts = await settled(proxy, proxy.request_ids)
        assert receipts["req-long"].outcome == "upstream_error"
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await upstream.close()


async def test_content_length_shorter_than_the_body_never_leaks_into_the_next_response() -> None:
    body = completion_body(prompt=1, completion=1)
    good = completion_body(prompt=5, completion=7)
    upstream = await scripted(
        {
            # The announced 10 bytes, then (on the now idle keep-alive connection) the rest.
            "short": [response_head(headers={"Content-Type": "application/json", "Content-Length": "10"}) + body[:10], 0.05, body[10:]],
        }
    ).start()
    proxy = await start(upstream.url)
    try:
        status, received, _ = await post(proxy, f"{CHAT}?fault=short", {"model": "m"})
        assert status == 200 and received == body[:10]  # what the upstream framed, nothing more
        await asyncio.sleep(0.1)  # the surplus bytes arrive on the pooled connection
        for _ in range(3):
            status, received, _ = await post(proxy, CHAT, {"model": "m"})
            assert status == 200 and received == good
        receipts = await settled(proxy, proxy.request_ids)
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await upstream.close()


async def test_stall_in_the_middle_of_a_buffered_body_is_a_clean_504() -> None:
    body = completion_body()
    head = response_head(headers={"Content-Type": "application/json", "Content-Length": str(len(body))})
    upstream = await scripted({"stall": [head + body[:9], "hang"]}).start()
    proxy = await start(upstream.url, upstream={"timeouts": {"idle_seconds": 0.3}})
    try:
        started = time.monotonic()
        status, received, _ = await post(proxy, f"{CHAT}?fault=stall", {"model": "m"}, headers={"X-Request-Id": "req-stall"})
        await assert_clean_json_error(status, received, 504, "upstream_timeout")
        assert 0.25 < time.monotonic() - started < 2.0
        await check_still_serves(proxy)
        receipts = await settled(proxy, proxy.request_ids)
        assert receipts["req-stall"].outcome == "upstream_timeout"
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await upstream.close()


async def test_malformed_chunk_mid_body_ends_the_exchange_at_once_not_at_the_idle_timeout() -> None:
    """aiohttp's C parser drops the response payload when a chunk header is garbage, so
    the read would wait for the idle timeout (120 s by default) although the upstream
    connection is already closed. The proxy ends the exchange when the connection goes."""
    json_head = response_head(headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    upstream = await scripted(
        {
            "stream": [SSE_HEAD + chunk(sse_event(0)), 0.05, b"zz\r\nhello\r\n", "close"],
            "buffered": [json_head + chunk(b'{"usage":'), 0.05, b"zz\r\nhello\r\n", "close"],
        }
    ).start()
    proxy = await start(upstream.url, upstream={"timeouts": {"idle_seconds": 30}})
    try:
        async with asyncio.timeout(5):
            started = time.monotonic()
            status, received, clean = await read_stream(proxy, "stream", "req-stream")
            assert status == 200 and not clean and received == sse_event(0)
            status, body, _ = await post(proxy, f"{CHAT}?fault=buffered", {"model": "m"}, headers={"X-Request-Id": "req-buffered"})
            await assert_clean_json_error(status, body, 502, "upstream_error")
            assert time.monotonic() - started < 3.0
            await check_still_serves(proxy)
            receipts = await settled(proxy, proxy.request_ids)
        assert receipts["req-stream"].outcome == "upstream_broken"
        assert receipts["req-buffered"].outcome == "upstream_error"
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await upstream.close()
