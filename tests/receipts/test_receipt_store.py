"""SqliteReceiptStore: batching, provisional -> final upsert, restart settling, retention,
size cap, and a database that cannot be written (locked, full, missing directory)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import AsyncIterator

import pytest
from receipts_fakes import finalize, make_receipt

from proxy.receipts import schema
from proxy.receipts.sqlite import SqliteReceiptStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteReceiptStore]:
    s = SqliteReceiptStore(str(tmp_path / "r.db"))
    await s.start()
    yield s
    await s.close()


def rows(path: Path, sql: str = "SELECT request_id, status, co2e_grams, basis FROM receipts ORDER BY request_id") -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_opens_in_wal_mode_with_synchronous_normal(store: SqliteReceiptStore, tmp_path: Path) -> None:
    assert rows(tmp_path / "r.db", "PRAGMA journal_mode") == [("wal",)]
    conn = schema.connect(store.path, busy_timeout_ms=100)
    assert conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    conn.close()
    assert store.healthy


async def test_a_burst_is_written_in_few_transactions(store: SqliteReceiptStore, tmp_path: Path) -> None:
    for i in range(2000):
        store.put(make_receipt(f"r{i:05d}"))
    await until(lambda: store.pending == 0)
    assert store.written_total == 2000
    assert store.batches_total <= 3  # one put each, but the writer takes them together
    assert len(rows(tmp_path / "r.db")) == 2000


async def test_provisional_then_final_is_one_row_and_usage_counts_the_final_figure(store: SqliteReceiptStore, tmp_path: Path) -> None:
    receipt = make_receipt("req-1", co2e_grams=0.5)
    store.put(receipt)
    assert await store.written("req-1", 2.0)
    assert rows(tmp_path / "r.db")[0][1] == "provisional"
    store.put(finalize(receipt, 0.75))
    assert await store.written("req-1", 2.0)
    assert rows(tmp_path / "r.db") == [("req-1", "final", 0.75, "meter=nvml; intensity=constant; pue=1.2; status=final")]
    usage = rows(tmp_path / "r.db", "SELECT period, co2e_grams FROM tenant_usage ORDER BY period")
    assert [grams for _, grams in usage] == [pytest.approx(0.75), pytest.approx(0.75)]  # day and month


async def test_a_late_provisional_never_overwrites_final(store: SqliteReceiptStore, tmp_path: Path) -> None:
    receipt = make_receipt("req-1")
    final = finalize(make_receipt("req-1", started_unix=receipt.started_unix), 0.9)
    store.put(final)
    assert await store.written("req-1", 2.0)
    store.put(receipt)  # out of order (e.g. a retried batch)
    await until(lambda: store.pending == 0)
    assert rows(tmp_path / "r.db")[0][1:3] == ("final", 0.9)


async def test_another_request_reusing_an_id_cannot_overwrite_the_receipt(store: SqliteReceiptStore, tmp_path: Path) -> None:
    store.put(make_receipt("shared-id", credential_hash="a" * 64, co2e_grams=1.0))
    assert await store.written("shared-id", 2.0)
    store.put(make_receipt("shared-id", credential_hash="b" * 64, co2e_grams=99.0))
    await until(lambda: store.pending == 0)
    got = await store.get("shared-id")
    assert got is not None and got.credential_hash == "a" * 64 and got.co2e_grams == 1.0


async def test_get_sees_a_receipt_before_and_after_it_is_written(store: SqliteReceiptStore) -> None:
    receipt = make_receipt("req-2", host_energy_joules=4.0, cached_tokens=96)
    store.put(receipt)
    first = await store.get("req-2")  # from the queue or the disk, whichever holds it now
    assert first == receipt
    await until(lambda: store.pending == 0)
    again = await store.get("req-2")
    assert again == receipt and again.device_energy_joules == 32.0
    assert await store.get("nope") is None


async def test_rows_left_provisional_by_a_crash_settle_at_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "r.db")
    first = SqliteReceiptStore(path)
    await first.start()
    first.put(make_receipt("done", status="final", basis="meter=nvml; status=final"))
    first.put(make_receipt("open"))
    await until(lambda: first.pending == 0)
    # A crash: the process dies without close(); the next one opens the same file.
    second = SqliteReceiptStore(path)
    await second.start()
    try:
        assert second.settled_at_restart == 1
        settled = await second.get("open")
        assert settled is not None and settled.status == "final"
        assert settled.basis == "meter=nvml; intensity=constant; pue=1.2; status=final; settled=restart"
        assert settled.co2e_grams == 0.006  # the provisional figures are kept
        done = await second.get("done")
        assert done is not None and "settled" not in done.basis
    finally:
        await second.close()
        await first.close()


async def test_retention_purges_old_receipts_but_keeps_budget_usage_of_the_month(tmp_path: Path) -> None:
    store = SqliteReceiptStore(str(tmp_path / "r.db"), retention_days=7)
    await store.start()
    try:
        now = time.time()
        store.put(make_receipt("old", started_unix=now - 8 * 86400))
        store.put(make_receipt("new", started_unix=now - 6 * 86400))
        await until(lambda: store.pending == 0)
        await store.maintain()
        assert [r[0] for r in rows(tmp_path / "r.db")] == ["new"]
        assert store.purged_total == 1
    finally:
        await store.close()


async def test_size_cap_drops_the_oldest_and_bounds_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = SqliteReceiptStore(str(path), max_mb=0.25)
    await store.start()
    try:
        start = time.time() - 10_000
        for i in range(4000):
            store.put(make_receipt(f"r{i:05d}", started_unix=start + i, basis="x" * 100))
        await until(lambda: store.pending == 0)
        await store.maintain()
        ids = [r[0] for r in rows(path)]
        assert 0 < len(ids) < 4000
        assert ids[-1] == "r03999" and "r00000" not in ids  # oldest first
        conn = sqlite3.connect(path)
        assert schema.used_bytes(conn) <= 0.25 * 1024 * 1024
        conn.close()
        assert path.stat().st_size <= 0.3 * 1024 * 1024  # pages went back to the filesystem
    finally:
        await store.close()


async def test_a_locked_database_never_raises_and_catches_up(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = SqliteReceiptStore(str(path), busy_timeout_ms=20, retry_max_seconds=0.05)
    await store.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        store.put(make_receipt("locked"))
        assert await store.written("locked", 1.0) is False
        await until(lambda: store.write_errors_total > 0)
        assert not store.healthy
        assert await store.get("locked") is not None  # still served from the queue
        assert await store.written("locked", 1.0) is False  # a failing store holds no response
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await until(lambda: store.pending == 0)
    assert store.healthy
    await store.close()
    assert [r[0] for r in rows(path)] == ["locked"]


async def test_a_full_disk_keeps_receipts_queued_without_raising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    connect = schema.connect

    def tiny(path: str, **kwargs: object) -> sqlite3.Connection:
        conn = connect(path, **kwargs)  # type: ignore[arg-type]
        if not kwargs.get("read_only"):
            conn.execute("PRAGMA max_page_count = 12")  # SQLITE_FULL a few rows in
        return conn

    monkeypatch.setattr(schema, "connect", tiny)
    store = SqliteReceiptStore(str(tmp_path / "r.db"), retry_max_seconds=0.05)
    await store.start()
    for i in range(300):
        store.put(make_receipt(f"r{i}", basis="x" * 500))
    await until(lambda: store.write_errors_total > 0)
    assert store.pending == 300 and store.dropped_total == 0
    assert "full" in (store.last_error or "")
    await store.close()  # gives up after a few tries; never raises
    assert store.dropped_total == 300


async def test_a_missing_directory_starts_queues_and_recovers(tmp_path: Path) -> None:
    target = tmp_path / "not-yet" / "r.db"
    store = SqliteReceiptStore(str(target), max_pending=10, retry_max_seconds=0.05)
    await store.start()  # does not raise
    assert not store.healthy
    for i in range(15):
        store.put(make_receipt(f"r{i}"))
    assert store.pending == 10 and store.dropped_total == 5
    store.put(finalize(make_receipt("r0"), 1.0))  # an update of a queued receipt is always taken
    assert store.dropped_total == 5
    got = await store.get("r3")
    assert got is not None
    (tmp_path / "not-yet").mkdir()
    await until(lambda: store.pending == 0)
    assert store.healthy
    await store.close()
    assert len(rows(target)) == 10


async def test_close_flushes_everything_queued(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = SqliteReceiptStore(str(path))
    await store.start()
    for i in range(500):
        store.put(make_receipt(f"r{i}"))
    await store.close()
    assert len(rows(path)) == 500
