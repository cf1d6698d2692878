"""Faults a client must see as clean JSON errors, never a traceback or a hang."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import aiohttp
from aiohttp import web
from helpers import FakeMeter, start_proxy, start_upstream


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_upstream_down_is_502_json() -> None:
    service = await start_proxy(f"http://127.0.0.1:{_free_port()}")
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{service.public_port}/v1/chat/completions", json={"model": "m"}) as response:
                body = await response.json()
                assert response.status == 502
                assert body["error"]["type"] == "upstream_unreachable"
                assert "Traceback" not in str(body)
                assert response.headers["X-Request-Id"]
    finally:
        await service.stop()


async def test_upstream_stall_before_headers_is_504_after_timeout() -> None:
    async def stall(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    runner, url = await start_upstream({"/v1/chat/completions": stall})
    service = await start_proxy(url, upstream={"timeouts": {"first_byte_seconds": 0.3}})
    try:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.post(f"http://127.0.0.1:{service.public_port}/v1/chat/completions", json={"model": "m"}) as response:
                body = await response.json()
            assert response.status == 504 and body["error"]["type"] == "upstream_timeout"
            assert 0.25 < time.monotonic() - started < 2.0
    finally:
        await service.stop()
        await runner.cleanup()


async def test_upstream_stall_mid_stream_cuts_the_stream_after_idle_timeout() -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
        await asyncio.sleep(30)
        return response

    runner, url = await start_upstream({"/v1/chat/completions": stall})
    service = await start_proxy(url, upstream={"timeouts": {"idle_seconds": 0.3}})
    try:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.post(f"http://127.0.0.1:{service.public_port}/v1/chat/completions", json={"model": "m", "stream": True}) as response:
                assert response.status == 200
                rid = response.headers["X-Carbon-Receipt-Id"]
                try:
                    await response.read()
                    clean_end = True
                except aiohttp.ClientPayloadError:
                    clean_end = False
            # A stalled stream must not look complete to the client.
            assert not clean_end
            assert time.monotonic() - started < 3.0
        receipt = await service.proxy.receipts.get(rid)
        assert receipt is not None and receipt.outcome == "upstream_timeout"
    finally:
        await service.stop()
        await runner.cleanup()


async def test_client_disconnect_closes_upstream_and_still_accounts() -> None:
    upstream_closed = asyncio.Event()
    tokens_sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal tokens_sent
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
                tokens_sent += 1
                await asyncio.sleep(0.02)
        except (ConnectionResetError, asyncio.CancelledError):
            upstream_closed.set()
            raise
        return response

    runner, url = await start_upstream({"/v1/chat/completions": endless})
    service = await start_proxy(url)
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"http://127.0.0.1:{service.public_port}/v1/chat/completions", json={"model": "m", "stream": True}
            )
            rid = response.headers["X-Carbon-Receipt-Id"]
            for _ in range(10):
                await response.content.readuntil(b"\n\n")
            response.close()  # the client goes away mid-stream
            closed_at = time.monotonic()
            await asyncio.wait_for(upstream_closed.wait(), 1.0)
            assert time.monotonic() - closed_at < 1.0
        await asyncio.sleep(0.3)  # let the meter cover the end
        receipt = await service.proxy.receipts.get(rid)
        assert receipt is not None
        assert receipt.outcome == "client_disconnected"
        assert receipt.output_tokens is not None and receipt.output_tokens >= 10
        assert receipt.energy_joules > 0
        assert receipt.status == "final"
    finally:
        await service.stop()
        await runner.cleanup()


async def test_oversize_body_is_413_and_never_reaches_upstream() -> None:
    hits = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        await request.read()
        return web.json_response({})

    runner, url = await start_upstream({"/v1/chat/completions": handler})
    service = await start_proxy(url, server={"max_body_bytes": 1000})
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{service.public_port}/v1/chat/completions", data=b"x" * 5000) as response:
                assert response.status == 413
                assert (await response.json())["error"]["type"] == "request_too_large"

            async def chunked():
                for _ in range(10):
                    yield b"y" * 500

            async with session.post(f"http://127.0.0.1:{service.public_port}/v1/chat/completions", data=chunked()) as response:
                assert response.status == 413
        assert hits == 0 or hits == 1  # a chunked upload may have begun before the limit was hit
    finally:
        await service.stop()
        await runner.cleanup()


async def test_absolute_form_target_is_refused() -> None:
    async def handler(request: web.Request) -> web.Response:
        raise AssertionError("must not be reached")

    runner, url = await start_upstream({"/{tail:.*}": handler})
    service = await start_proxy(url)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.public_port)
        writer.write(b"GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 400")
        assert b"invalid_request_target" in raw
    finally:
        await service.stop()
        await runner.cleanup()


async def test_meter_failure_never_fails_a_request_and_basis_says_so() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"usage": {"prompt_tokens": 3, "completion_tokens": 4}})

    runner, url = await start_upstream({"/v1/completions": handler})
    meter = FakeMeter()
    service = await start_proxy(url, meter=meter)
    try:
        meter.fail = RuntimeError("NVML: GPU is lost")
        await asyncio.sleep(0.35)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{service.public_port}/v1/completions", json={"model": "m", "prompt": "x"}) as response:
                assert response.status == 200
                assert "meter_status=down" in response.headers["X-Emissions-Basis"]
            async with session.get(f"http://127.0.0.1:{service.admin_port}/readyz") as ready:
                assert ready.status == 503
                assert "GPU is lost" in (await ready.text())
    finally:
        await service.stop()
        await runner.cleanup()


def test_broken_config_exits_2_naming_the_key(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[upstreams]]\nname = "a"\nurl = "http://127.0.0.1:8000"\ndialect = "klingon"\n')
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "upstreams[0].dialect" in result.stderr and "klingon" in result.stderr
    assert "Traceback" not in result.stderr

    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "ftp://nowhere", "--meter", "estimate"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "--upstream" in result.stderr
