"""SIGTERM during 500 open streams, against a real `python -m proxy serve --config` process.

DESIGN 8: SIGTERM drains in-flight streams up to a deadline; nothing accounted is lost.
What a user (or Kubernetes) checks: new connections are refused at once, every open
stream completes within drain_seconds with its figures (`: emissions` comment) at the
end, the process exits 0, and the receipts file holds each request once, final. Streams
still open at the deadline are cut so that the client sees a broken stream (never a clean
end), and their partial work is still in the receipts file, final.

(One in-flight request through the deployed image's arguments: tests/deploy.)
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from helpers import start_upstream

from .support import CHAT, sse_event

STREAMS = 500
EVENTS = 10
PACE_SECONDS = 0.3  # each stream lasts ~3 s: long enough to be open at SIGTERM
DRAIN_SECONDS = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def paced(events: int):
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(events):
                await response.write(sse_event(i))
                await asyncio.sleep(PACE_SECONDS)
            await response.write(b"data: [DONE]\n\n")
        except ConnectionError:
            pass  # the proxy cut the stream (drain deadline)
        return response

    return handler


def write_config(tmp_path: Path, upstream: str, port: int, admin_port: int, drain_seconds: float = DRAIN_SECONDS) -> Path:
    path = tmp_path / "carbon-proxy.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
drain_seconds = {drain_seconds}

[[upstreams]]
name = "paced"
url = "{upstream}"
dialect = "openai"

[meter]
kind = "estimate"
interval_ms = 100

[meter.estimate]
power_watts = 300

[carbon]
intensity = 450

[receipts]
path = "{tmp_path / 'receipts.db'}"
"""
    )
    return path


async def wait_healthy(session: aiohttp.ClientSession, admin_port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            async with session.get(f"http://127.0.0.1:{admin_port}/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the proxy did not start:\n" + log.read_text())


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_sigterm_during_500_open_streams_drains_them_with_figures_and_exits_0(tmp_path: Path) -> None:
    runner, upstream = await start_upstream({CHAT: paced(EVENTS)})
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, upstream, port, admin_port)
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))
    try:
        await wait_healthy(session, admin_port, process, log)
        opened = 0
        all_open = asyncio.Event()

        async def stream(i: int) -> bytes:
            nonlocal opened
            headers = {"X-Request-Id": f"drain-{i:03d}"}
            async with session.post(f"http://127.0.0.1:{port}{CHAT}", json={"model": "m", "stream": True}, headers=headers) as response:
                assert response.status == 200
                first = await response.content.readuntil(b"\n\n")
                opened += 1
                if opened == STREAMS:
                    all_open.set()
                return first + await response.read()

        tasks = [asyncio.create_task(stream(i)) for i in range(STREAMS)]
        await asyncio.wait_for(all_open.wait(), 20)

        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        deadline = signalled + 2.0
        while not await refused(port):  # the listener closes first
            assert time.monotonic() < deadline, "new connections still accepted after SIGTERM"
            await asyncio.sleep(0.02)
        assert sum(t.done() for t in tasks) < STREAMS // 2, "the streams should still be open while new ones are refused"

        bodies = await asyncio.wait_for(asyncio.gather(*tasks), DRAIN_SECONDS + 2)
        assert time.monotonic() - signalled < DRAIN_SECONDS + 1
        events = b"".join(sse_event(i) for i in range(EVENTS))
        for body in bodies:
            assert body.startswith(events), body[:200]
            rest = body[len(events) :]
            assert rest.startswith(b": emissions {") and rest.endswith(b"}\n\ndata: [DONE]\n\n"), rest

        assert await asyncio.to_thread(process.wait, DRAIN_SECONDS + 10) == 0, log.read_text()[-3000:]
        assert b"Traceback" not in log.read_bytes()
        with sqlite3.connect(tmp_path / "receipts.db") as db:
            rows = db.execute("SELECT request_id, outcome, status FROM receipts").fetchall()
        assert sorted(r[0] for r in rows) == [f"drain-{i:03d}" for i in range(STREAMS)]  # each once
        assert {(outcome, status) for _, outcome, status in rows} == {("ok", "final")}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        await session.close()
        await runner.cleanup()


async def test_streams_still_open_at_the_drain_deadline_are_cut_visibly_and_still_accounted(tmp_path: Path) -> None:
    streams, drain = 50, 1.0
    runner, upstream = await start_upstream({CHAT: paced(30)})  # ~9 s: far past the deadline
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, upstream, port, admin_port, drain_seconds=drain)
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60))
    try:
        await wait_healthy(session, admin_port, process, log)
        opened = asyncio.Semaphore(0)

        async def stream(i: int) -> bool:
            headers = {"X-Request-Id": f"cut-{i:02d}"}
            async with session.post(f"http://127.0.0.1:{port}{CHAT}", json={"model": "m", "stream": True}, headers=headers) as response:
                await response.content.readuntil(b"\n\n")
                opened.release()
                try:
                    await response.read()
                    return True
                except aiohttp.ClientPayloadError:
                    return False

        tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
        for _ in range(streams):
            await asyncio.wait_for(opened.acquire(), 20)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        clean = await asyncio.wait_for(asyncio.gather(*tasks), drain + 5)
        assert not any(clean), "a stream cut at the deadline must not look complete"
        assert await asyncio.to_thread(process.wait, drain + 10) == 0, log.read_text()[-3000:]
        assert time.monotonic() - signalled < drain + 4
        with sqlite3.connect(tmp_path / "receipts.db") as db:
            rows = db.execute("SELECT request_id, outcome, status, energy_joules FROM receipts").fetchall()
        assert sorted(r[0] for r in rows) == [f"cut-{i:02d}" for i in range(streams)]
        for _, outcome, status, joules in rows:
            assert outcome == "shutdown" and status == "final" and joules > 0  # the partial work is accounted
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        await session.close()
        await runner.cleanup()
