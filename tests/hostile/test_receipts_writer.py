"""The receipts writer against rows it can never write and against its own death (issue
13 row 1, the storage end): a poison row is dropped alone, logged once and counted; a
writer that died anyway fails /readyz, shows in the metrics, stops holding responses,
and what it could not write is counted in a log line at shutdown."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.receipts import schema
from proxy.receipts.model import Receipt
from proxy.receipts.sqlite import SqliteReceiptStore

from .support import HostileProxy, until


def receipt(request_id: str, tenant: str = "team-a", **fields: object) -> Receipt:
    values: dict[str, object] = dict(
        receipt_id=request_id, request_id=request_id, credential_hash=None, tenant=tenant, upstream="u", model="m", dialect="openai",
        method="POST", path="/v1/chat/completions", status_code=200, outcome="ok", started_unix=time.time(),
        duration_seconds=0.1, time_to_first_byte_seconds=0.01, prompt_tokens=3, output_tokens=4, work_units=None,
        images=0, energy_joules=1.0, pue=1.2, intensity_g_per_kwh=400.0, operational_grams=0.1, embodied_grams=0.01,
        co2e_grams=0.11, basis="test", status="final",
    )  # fmt: skip
    values.update(fields)
    return Receipt(**values)  # type: ignore[arg-type]


def ids_on_disk(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT request_id FROM receipts")}
    finally:
        conn.close()


async def test_a_poison_row_is_dropped_alone_and_the_writer_keeps_writing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "r.db"
    store = SqliteReceiptStore(str(path))
    await store.start()
    try:
        # One batch: good rows around two that SQLite cannot bind (lone surrogates are what
        # aiohttp makes of bytes that are not UTF-8).
        store.put(receipt("good-1"))
        store.put(receipt("poison-1", tenant="bad-\udcff"))
        store.put(receipt("good-2"))
        store.put(receipt("poison-2", model="m\udcfe"))
        store.put(receipt("good-3"))
        assert await store.written("good-3", 5.0)
        assert ids_on_disk(path) == {"good-1", "good-2", "good-3"}
        assert store.poison_total == 2 and store.writer_up and store.healthy
        # Later receipts still reach the file, each in its own batch too.
        store.put(receipt("poison-3", tenant="x\udcff"))
        store.put(receipt("good-4"))
        assert await store.written("good-4", 5.0)
        assert "good-4" in ids_on_disk(path) and store.poison_total == 3
    finally:
        await store.close()
    logged = [r for r in caplog.records if r.name == "carbon_proxy.receipts" and r.levelno >= logging.ERROR]
    assert len(logged) == 1, [r.getMessage() for r in logged]  # once, with the reason; the rest counted
    message = logged[0].getMessage()
    assert "poison-1" in message and "column tenant" in message and "bad-" not in message


async def test_budget_usage_keeps_being_saved_after_a_poison_row(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = SqliteReceiptStore(str(path))
    await store.start()
    try:
        store.put(receipt("poison", tenant="bad-\udcff", co2e_grams=5.0))
        store.put(receipt("later", tenant="team-b", co2e_grams=0.5))
        assert await store.written("later", 5.0)
        usage = await store.tenant_usage_grams(["month:" + time.strftime("%Y-%m", time.gmtime())])
        assert list(usage.values()) == [pytest.approx(0.5)] and {t for t, _ in usage} == {"team-b"}
    finally:
        await store.close()


async def test_a_dead_writer_fails_readiness_shows_in_metrics_and_its_losses_are_logged(
    hostile_proxy: HostileProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(hostile_proxy.admin + "/readyz") as response:
            ready = await response.json()
        assert ready["checks"]["receipts"]["ok"] is True, ready

        def broken(*args: object) -> None:
            raise RuntimeError("a bug in housekeeping")

        monkeypatch.setattr(schema, "purge_expired", broken)  # anything the writer does outside a batch
        await asyncio.wait_for(hostile_proxy.store.maintain(), 5.0)  # released when the writer dies
        await until(lambda: not hostile_proxy.store.writer_up, 5.0, "the writer to stop")

        async with session.get(hostile_proxy.admin + "/readyz") as response:
            assert response.status == 503
            ready = await response.json()
        assert ready["checks"]["receipts"]["ok"] is False and ready["checks"]["receipts"]["writer_up"] is False
        async with session.get(hostile_proxy.admin + "/metrics") as response:
            metrics = await response.text()
        assert "carbon_proxy_receipts_writer_up 0.0" in metrics

    # Requests are still served, and do not wait for a commit that cannot come.
    status, _, headers = await hostile_proxy.post("/v1/chat/completions", {"model": "m", "messages": []})
    assert status == 200
    assert await asyncio.wait_for(hostile_proxy.store.written(headers["X-Carbon-Receipt-Id"], 30.0), 1.0) is False
    await hostile_proxy.close()
    hostile_proxy.close = _noop  # type: ignore[method-assign]  # the fixture closes it again
    messages = [r.getMessage() for r in caplog.records if r.name == "carbon_proxy.receipts"]
    assert any("writer thread stopped" in m for m in messages), messages
    assert any("could not be written: the writer had stopped" in m for m in messages), messages


async def _noop() -> None:
    return None


async def test_metrics_show_poison_rows(hostile_proxy: HostileProxy) -> None:
    hostile_proxy.store.put(receipt("poison", tenant="bad-\udcff"))
    await hostile_proxy.normal_request()
    async with aiohttp.ClientSession() as session:
        async with session.get(hostile_proxy.admin + "/metrics") as response:
            metrics = await response.text()
    assert "carbon_proxy_receipts_poison_total 1.0" in metrics
    assert "carbon_proxy_receipts_writer_up 1.0" in metrics
    await hostile_proxy.after_attack()
