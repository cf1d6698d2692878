"""Crash test: `kill -9` of a real `carbon-proxy serve` under load, then a restart.

Every request whose response the client received in full has its receipt in the
database exactly once, and nothing stays provisional after the restart.
"""

from __future__ import annotations

import asyncio
import os
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

KEY = "sk-crash-test-key"
WORKERS = 24
KILL_AFTER_COMPLETED = 800


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def completion(request: web.Request) -> web.Response:
    await request.read()
    await asyncio.sleep(0.005)
    return web.json_response({"id": "x", "object": "chat.completion", "model": "m", "usage": {"prompt_tokens": 7, "completion_tokens": 21}})


def write_config(tmp_path: Path, upstream_url: str, port: int, admin_port: int) -> Path:
    config = tmp_path / "proxy.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
drain_seconds = 1

[[upstreams]]
name = "llm"
url = "{upstream_url}"
devices = ["0"]

[meter]
kind = "estimate"
interval_ms = 250          # slow settling: the kill finds provisional receipts

[meter.estimate]
power_watts = 300

[carbon]
intensity = 450

[attribution]
idle_power_watts = 60

[receipts]
path = "{tmp_path / 'crash.db'}"
commit_wait_ms = 2000      # generous on a shared CI machine; the commit takes about a millisecond
"""
    )
    return config


async def start_proxy(config: Path, admin_port: int, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while True:
            assert process.poll() is None, log.read_text()
            try:
                async with session.get(f"http://127.0.0.1:{admin_port}/healthz") as response:
                    if response.status == 200:
                        return process
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "proxy did not start"
            await asyncio.sleep(0.05)


async def load(port: int, completed: set[str], stop: asyncio.Event) -> None:
    counter = iter(range(10**9))

    async def worker(session: aiohttp.ClientSession, name: int) -> None:
        while not stop.is_set():
            request_id = f"w{name}-{next(counter)}"
            try:
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"model": "m", "messages": []},
                    headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": request_id},
                ) as response:
                    body = await response.read()
                    if response.status == 200 and body.endswith(b"}"):
                        completed.add(request_id)  # the client has the whole response
            except (aiohttp.ClientError, asyncio.TimeoutError):
                await asyncio.sleep(0.01)  # the proxy is gone

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session, i) for i in range(WORKERS)))


async def test_kill_9_under_load_loses_no_completed_receipt(tmp_path: Path) -> None:
    upstream, url = await start_upstream({"/v1/chat/completions": completion})
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, url, port, admin_port)
    log = tmp_path / "proxy.log"
    completed: set[str] = set()
    stop = asyncio.Event()
    process = await start_proxy(config, admin_port, log)
    traffic = asyncio.create_task(load(port, completed, stop))
    try:
        deadline = time.monotonic() + 30
        while len(completed) < KILL_AFTER_COMPLETED:
            assert time.monotonic() < deadline and not traffic.done(), log.read_text()
            await asyncio.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)  # mid-load: requests in flight, batches queued
        process.wait(10)
        await asyncio.sleep(0.2)
        stop.set()
        await traffic
        killed_with = set(completed)

        db = tmp_path / "crash.db"
        process = await start_proxy(config, admin_port, log)  # settles what the crash left
        conn = sqlite3.connect(db)
        stored = [r for (r,) in conn.execute("SELECT request_id FROM receipts")]
        provisional = conn.execute("SELECT count(*) FROM receipts WHERE status = 'provisional'").fetchone()[0]
        settled = conn.execute("SELECT count(*) FROM receipts WHERE basis LIKE '%settled=restart'").fetchone()[0]
        conn.close()

        missing = killed_with - set(stored)
        assert not missing, f"{len(missing)} completed request(s) without a receipt, e.g. {sorted(missing)[:5]}"
        assert len(stored) == len(set(stored))  # none twice
        assert provisional == 0
        assert settled > 0  # the kill did find receipts waiting for their final figures

        async with aiohttp.ClientSession() as session:
            some = sorted(killed_with)[0]
            async with session.get(
                f"http://127.0.0.1:{port}/carbon-proxy/v1/receipts/{some}", headers={"Authorization": f"Bearer {KEY}"}
            ) as response:
                body = await response.json()
                assert response.status == 200 and body["status"] == "final"
    finally:
        stop.set()
        if not traffic.done():
            traffic.cancel()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        await upstream.cleanup()
    assert process.returncode == 0, log.read_text()
