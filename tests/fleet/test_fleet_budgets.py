"""Fleet budgets against a real PostgreSQL: replicas see each other's spend, and while
the store is down "open" serves flagged (basis budget=local, metrics) and "closed"
answers 503."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from helpers import FakeMeter, proxy_config, start_upstream
from prometheus_client import CollectorRegistry

from proxy.carbon.intensity import ConstantIntensity
from proxy.config import config_from_dict
from proxy.receipts.fleet import FleetReceiptStore
from proxy.receipts.postgres import Postgres
from proxy.receipts.shipper import Shipper
from proxy.receipts.sqlite import SqliteReceiptStore
from proxy.serve import Service

from .pg import Cluster

CHAT = "/v1/chat/completions"


async def completion(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"id": "c", "object": "chat.completion", "usage": {"prompt_tokens": 5, "completion_tokens": 7}})


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    runner, url = await start_upstream({CHAT: completion})
    yield url
    await runner.cleanup()


async def replica(tmp: Path, name: str, upstream: str, dsn: str, tenants: dict[str, Any]) -> tuple[Service, CollectorRegistry]:
    """A replica in this process, under its own name (two in one process must differ)."""
    path = str(tmp / f"{name}.db")
    postgres = Postgres(dsn, timeout_seconds=1.0)
    store = FleetReceiptStore(SqliteReceiptStore(path, outbox=True), postgres, Shipper(path, postgres, name))
    tenants = {"header": "X-Tenant-Id", "allow": ["team"], **tenants}
    config = config_from_dict(proxy_config(upstream, receipts={"path": path}, meter={"interval_ms": 20}, tenants=tenants))
    registry = CollectorRegistry()
    service = Service(config, meter=FakeMeter(), intensity=ConstantIntensity(450), receipts=store, registry=registry)
    await service.start()
    return service, registry


async def call(service: Service, tenant: str = "team") -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": [], "max_tokens": 5}
        async with session.post(f"http://127.0.0.1:{service.public_port}{CHAT}", json=body, headers={"X-Tenant-Id": tenant}) as response:
            await response.read()
            return response.status, dict(response.headers)


async def test_a_replica_refuses_once_another_replica_used_the_budget(tmp_path: Path, upstream: str, dsn: str) -> None:
    tenants = {"budgets": {"team": {"grams": 1e-9, "period": "month"}}}
    first, _ = await replica(tmp_path, "a", upstream, dsn, tenants)
    second, registry = await replica(tmp_path, "b", upstream, dsn, tenants)
    try:
        assert (await call(first))[0] == 200  # alone: uses the tiny budget up
        deadline = time.monotonic() + 5
        while (await call(second))[0] != 429:  # the shared figures reach the other replica
            assert time.monotonic() < deadline, "the second replica never saw the first one's spend"
        remaining = registry.get_sample_value("carbon_proxy_tenant_budget_remaining_grams", {"tenant": "team"})
        assert remaining is not None and remaining < 0
        assert registry.get_sample_value("carbon_proxy_budget_store_up") == 1.0
    finally:
        await first.stop()
        await second.stop()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_the_store_down_is_open_or_closed_and_flagged(tmp_path: Path, upstream: str, dsn: str, cluster: Cluster, mode: str) -> None:
    tenants = {"budgets": {"team": {"grams": 100.0}}, "budget_on_store_down": mode}
    service, registry = await replica(tmp_path, "a", upstream, dsn, tenants)
    try:
        status, headers = await call(service)
        assert status == 200 and "budget=local" not in headers["X-Emissions-Basis"]
        cluster.stop()
        try:
            time.sleep(1.1)  # older than a sync's max age: the next admission asks the store
            status, headers = await call(service)
            if mode == "open":
                assert status == 200 and headers["X-Emissions-Basis"].endswith("; budget=local")
                assert registry.get_sample_value("carbon_proxy_budget_store_down_admissions_total") >= 1
            else:
                assert status == 503 and headers["Retry-After"] == "1"
            assert registry.get_sample_value("carbon_proxy_budget_store_up") == 0.0
            status, headers = await call(service, tenant="no-budget")  # other tenants are never held up
            assert status == 200
        finally:
            cluster.start()
        deadline = time.monotonic() + 10
        while True:  # back in sync: no flag, served
            status, headers = await call(service)
            if status == 200 and "budget=local" not in headers["X-Emissions-Basis"]:
                break
            assert time.monotonic() < deadline, (status, headers.get("X-Emissions-Basis"))
    finally:
        await service.stop()


async def test_a_database_that_never_answers_holds_no_request(tmp_path: Path, upstream: str) -> None:
    """A blackholed host (accepts, then silence) instead of a stopped one: requests go on
    flagged instead of waiting for the 5 s connection timeout, over and over."""
    import asyncio

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers the startup message

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    service, _ = await replica(tmp_path, "a", upstream, f"postgresql://carbon@127.0.0.1:{port}/x", {"budgets": {"team": {"grams": 100.0}}})
    try:
        took = []
        for _ in range(5):
            started = time.monotonic()
            status, headers = await call(service)
            took.append(time.monotonic() - started)
            assert status == 200
        assert headers["X-Emissions-Basis"].endswith("; budget=local")
        assert sum(took) < 3.0, took  # one connection timeout alone would be 5 s
    finally:
        await service.stop()
        server.close()
