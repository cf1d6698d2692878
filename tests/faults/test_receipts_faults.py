"""Receipt storage faults seen through a running proxy with the SQLite store: a database
locked by another process, a full disk, and a store that raises. DESIGN 8: storage never
fails, blocks or slows a request; receipts wait in memory (still readable at the
endpoint) and reach the disk exactly once when it is writable again.

(Store-level lock, full-disk, missing-directory and crash tests: tests/receipts.)
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any, Sequence

import orjson
import pytest
from aiohttp import web
from helpers import start_upstream

from proxy.receipts import schema
from proxy.receipts.model import Receipt
from proxy.receipts.sqlite import SqliteReceiptStore

from .support import CHAT, Proxy, assert_clean_json_error, assert_conserved, check_still_serves, completion_body, post, settled, sse_event, start, until


async def completion(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=completion_body(), content_type="application/json")


async def stream(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(5):
        await response.write(sse_event(i))
        await asyncio.sleep(0.01)
    await response.write(b"data: [DONE]\n\n")
    return response


async def traffic(proxy: Proxy) -> None:
    """Ten completions and four streams, each served at the upstream's pace with figures."""

    async def one(path: str, payload: dict[str, Any]) -> None:
        started = time.monotonic()
        status, body, headers = await post(proxy, path, payload)
        assert status == 200 and time.monotonic() - started < 0.5  # commit waits are bounded, then skipped
        if payload.get("stream"):
            assert b": emissions {" in body
        else:
            assert float(headers["X-Energy-Joules"]) > 0

    await asyncio.gather(
        *(one("/v1/completions", {"model": "m", "prompt": "x"}) for _ in range(10)),
        *(one(CHAT, {"model": "m", "stream": True}) for _ in range(4)),
    )


async def endpoint(proxy: Proxy, request_id: str) -> tuple[int, bytes]:
    async with proxy.session.get(f"{proxy.base}/carbon-proxy/v1/receipts/{request_id}") as response:
        return response.status, await response.read()


def rows(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT request_id, status FROM receipts").fetchall()


async def written_once(proxy: Proxy, store: SqliteReceiptStore, path: Path, request_ids: Sequence[str]) -> None:
    """Everything reaches the disk once the fault is gone: one final row per request."""
    await until(lambda: store.pending == 0 and store.healthy, 10, "the queued receipts to be written")
    receipts = await settled(proxy, request_ids)
    assert_conserved(proxy, receipts)
    await proxy.close()  # flushes the final figures
    on_disk = rows(path)
    assert sorted(rid for rid, _ in on_disk) == sorted(request_ids)  # each exactly once
    assert {status for _, status in on_disk} == {"final"}
    assert store.dropped_total == 0


async def test_a_database_locked_by_another_process_never_blocks_requests(tmp_path: Path) -> None:
    path = tmp_path / "receipts.db"
    runner, url = await start_upstream({"/v1/completions": completion, CHAT: stream})
    store = SqliteReceiptStore(str(path), busy_timeout_ms=50, retry_max_seconds=0.1)
    proxy = await start(url, store=store)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # e.g. a backup or a report holding the write lock
        await traffic(proxy)
        await until(lambda: not store.healthy, 5, "the store to report the lock")
        assert "locked" in (store.last_error or "")
        status, body = await endpoint(proxy, proxy.request_ids[0])  # served from the queue
        assert status == 200 and orjson.loads(body)["request_id"] == proxy.request_ids[0]
        await traffic(proxy)  # a failing store is not waited on at all
        blocker.execute("ROLLBACK")
        await written_once(proxy, store, path, proxy.request_ids)
    finally:
        blocker.close()
        await proxy.close()
        await runner.cleanup()


async def test_a_full_disk_never_fails_requests_and_receipts_are_written_when_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "receipts.db"
    full = {"on": True}
    connect = schema.connect

    def on_a_full_disk(target: str, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(target, **kwargs)
        if full["on"] and not kwargs.get("read_only"):
            conn.execute("PRAGMA max_page_count = 1")  # SQLITE_FULL on the first page it needs
        return conn

    monkeypatch.setattr(schema, "connect", on_a_full_disk)
    runner, url = await start_upstream({"/v1/completions": completion, CHAT: stream})
    store = SqliteReceiptStore(str(path), retry_max_seconds=0.1)
    proxy = await start(url, store=store)  # starts although the database cannot be created
    try:
        await traffic(proxy)
        assert not store.healthy and "full" in (store.last_error or "")
        status, body = await endpoint(proxy, proxy.request_ids[-1])
        assert status == 200 and orjson.loads(body)["request_id"] == proxy.request_ids[-1]
        full["on"] = False  # space freed
        await written_once(proxy, store, path, proxy.request_ids)
    finally:
        await proxy.close()
        await runner.cleanup()


class BrokenStore:
    """Every call fails, as a store on a dead volume might."""

    async def start(self) -> None:
        return None

    def put(self, receipt: Receipt) -> None:
        raise OSError(5, "Input/output error")

    async def get(self, receipt_id: str) -> Receipt | None:
        raise OSError(5, "Input/output error")

    async def find(self, credential_hash: str | None, request_id: str, limit: int) -> list[Receipt]:
        raise OSError(5, "Input/output error")

    async def written(self, request_id: str, timeout_seconds: float) -> bool:
        raise OSError(5, "Input/output error")

    async def tenant_usage_grams(self, periods: Sequence[str], tenants: Sequence[str] | None = None) -> dict[tuple[str, str], float]:
        return {}

    async def close(self) -> None:
        return None


async def test_a_store_that_raises_never_fails_requests_and_the_endpoint_answers_503() -> None:
    runner, url = await start_upstream({"/v1/completions": completion, CHAT: stream})
    proxy = await start(url, store=BrokenStore())
    records: dict[str, Receipt] = {}
    proxy.service.proxy.on_record(lambda receipt, figures, exchange: records.__setitem__(receipt.request_id, receipt))
    try:
        await traffic(proxy)
        status, body = await endpoint(proxy, proxy.request_ids[0])
        await assert_clean_json_error(status, body, 503, "receipts_unavailable")
        await check_still_serves(proxy, "/v1/completions", {"model": "m", "prompt": "x"})
        # Metrics still see every figure (provisional, then final), so nothing is lost.
        await until(lambda: len(records) == len(proxy.request_ids) and all(r.status == "final" for r in records.values()), 5, "final figures")
        assert_conserved(proxy, records)
    finally:
        await proxy.close()
        await runner.cleanup()
