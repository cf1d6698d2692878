"""Proxy processes sharing one PostgreSQL: three replicas and one budget under a burst
(overshoot within the stated bound), and a replica killed with SIGKILL while shipping
(the outbox resumes at the next start: nothing lost, nothing doubled)."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web
from helpers import start_upstream

from proxy.budgets.cost import PRIOR_GRAMS_PER_TOKEN
from proxy.dialects.base import estimate_tokens_from_text

from .pg import Cluster, free_ports

CHAT = "/v1/chat/completions"
HOLD_SECONDS = 0.5
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}


async def held(request: web.Request) -> web.Response:
    await request.read()
    await asyncio.sleep(HOLD_SECONDS)
    return web.json_response({"id": "c", "object": "chat.completion", "usage": {"prompt_tokens": 5, "completion_tokens": 20}})


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log: Path
    db: Path

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{CHAT}"


def start_replica(tmp: Path, name: str, upstream: str, dsn: str, budget_grams: float) -> Replica:
    port, admin_port = free_ports(2)
    folder = tmp / name
    folder.mkdir()
    config = folder / "carbon-proxy.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
drain_seconds = 5

[[upstreams]]
name = "held"
url = "{upstream}"
dialect = "openai"

[meter]
kind = "estimate"
interval_ms = 50

[meter.estimate]
power_watts = 300

[carbon]
intensity = 450

[receipts]
path = "{folder / 'receipts.db'}"
backend = "postgres"
dsn = "{dsn}"

[tenants]
header = "X-Tenant-Id"
allow = ["team"]

[tenants.budgets]
team = {{ grams = {budget_grams}, period = "month" }}
"""
    )
    log = folder / "proxy.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    return Replica(process, port, admin_port, log, folder / "receipts.db")


async def wait_healthy(session: aiohttp.ClientSession, replica: Replica) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert replica.process.poll() is None, replica.log.read_text()
        try:
            async with session.get(f"http://127.0.0.1:{replica.admin_port}/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("replica did not start:\n" + replica.log.read_text())


def stop(replica: Replica, sig: int = signal.SIGTERM) -> int:
    if replica.process.poll() is None:
        replica.process.send_signal(sig)
    return replica.process.wait(30)


async def fetch(dsn: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def settled_in_postgres(dsn: str, expected: int, timeout: float = 30.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await fetch(dsn, "SELECT receipt_id, co2e_grams, status FROM carbon_receipts WHERE tenant = 'team'")
        if len(rows) >= expected and all(r[2] == "final" for r in rows):
            return rows
        assert time.monotonic() < deadline, f"{len(rows)} of {expected} receipts in PostgreSQL"
        await asyncio.sleep(0.2)


async def test_three_replicas_share_one_budget_under_a_burst(tmp_path: Path, dsn: str) -> None:
    runner, upstream = await start_upstream({CHAT: held})
    # What each request reserves: the prior per token x (prompt estimate + max_tokens);
    # nothing is learned before the burst's first receipt settles.
    predicted = PRIOR_GRAMS_PER_TOKEN * (estimate_tokens_from_text(len(orjson.dumps(BODY))) + BODY["max_tokens"])
    budget = 12.5 * predicted  # room for 12 requests' reservations, fleet-wide
    replicas = [start_replica(tmp_path, f"r{i}", upstream, dsn, budget) for i in range(3)]
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            for replica in replicas:
                await wait_healthy(session, replica)

            async def one(replica: Replica) -> int:
                async with session.post(replica.url(), json=BODY, headers={"X-Tenant-Id": "team"}) as response:
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(one(replicas[i % 3]) for i in range(150)))
        admitted = statuses.count(200)
        assert statuses.count(429) == 150 - admitted
        for replica in replicas:
            assert stop(replica) == 0, replica.log.read_text()[-3000:]
        rows = await settled_in_postgres(dsn, admitted)
    finally:
        for replica in replicas:
            if replica.process.poll() is None:
                replica.process.kill()
        await runner.cleanup()
    spent = sum(r[1] for r in rows)
    error = sum(max(0.0, r[1] - predicted) for r in rows)
    # Shared reservations: the fleet admits what fits the budget once (12, plus one that
    # may run alone), not once per replica (36).
    assert 1 <= admitted <= 13, admitted
    assert len(rows) == admitted and len({r[0] for r in rows}) == admitted
    # The bound (README, "Fleet budgets"): with 3 replicas (3 x 0.1 < 1) only the
    # under-prediction of the requests in flight can push past the budget.
    assert spent <= budget + error, (spent, budget, error)
    print(f"\nfleet burst: 3 replicas, 150 requests, budget {budget:.4f} g, admitted {admitted}, spent {spent:.4f} g, "
          f"overshoot {max(0.0, spent - budget):.4f} g, bound {error:.4f} g")


async def test_a_replica_killed_mid_shipment_resumes_from_its_outbox(tmp_path: Path, dsn: str, cluster: Cluster) -> None:
    """PostgreSQL goes away for part of the load, so the kill finds receipts shipped and
    receipts still in the outbox (the exact window between PostgreSQL's commit and the
    outbox delete is covered in test_shipping)."""
    runner, upstream = await start_upstream({CHAT: quick})
    replica = start_replica(tmp_path, "r0", upstream, dsn, budget_grams=1e9)
    seen: list[str] = []
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, replica)

            async def load() -> None:
                while True:
                    try:
                        async with session.post(replica.url(), json=BODY, headers={"X-Tenant-Id": "team"}) as response:
                            await response.read()
                            if response.status == 200:
                                seen.append(response.headers["X-Carbon-Receipt-Id"])
                    except aiohttp.ClientError:
                        return  # the replica is gone

            loaders = [asyncio.create_task(load()) for _ in range(8)]
            await asyncio.sleep(1.0)  # receipts are being written and shipped continuously
            await asyncio.to_thread(cluster.stop)
            try:
                await asyncio.sleep(1.0)  # ... and now pile up in the outbox
                assert stop(replica, signal.SIGKILL) == -signal.SIGKILL
                await asyncio.gather(*loaders)
            finally:
                await asyncio.to_thread(cluster.start)
        shipped_before = len(await fetch(dsn, "SELECT 1 FROM carbon_receipts"))
        with sqlite3.connect(replica.db) as db:
            local = {r[0] for r in db.execute("SELECT receipt_id FROM receipts")}
        assert set(seen) <= local  # a response seen complete had its receipt on local disk
        assert 0 < shipped_before < len(local)
        replica = _restart(replica)
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, replica)
        rows = await settled_in_postgres(dsn, len(local))
        assert stop(replica) == 0
    finally:
        if replica.process.poll() is None:
            replica.process.kill()
        await runner.cleanup()
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)) == len(local)  # none lost, none twice
    assert set(ids) == local and set(seen) <= set(ids)
    print(f"\nSIGKILL mid-shipment: {len(local)} receipts, {shipped_before} shipped before the kill, the rest from the outbox")


def _restart(replica: Replica) -> Replica:
    """The same config and files, a new process."""
    config = replica.log.parent / "carbon-proxy.toml"
    log = replica.log.parent / "proxy-restarted.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    return Replica(process, replica.port, replica.admin_port, log, replica.db)


async def quick(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"id": "c", "object": "chat.completion", "usage": {"prompt_tokens": 5, "completion_tokens": 20}})
