"""Routing's two receipt columns reach PostgreSQL, also in a table an older version made."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg

from proxy.receipts import pg_schema
from proxy.receipts.fleet_report import build_fleet_report
from proxy.receipts.postgres import Postgres
from proxy.receipts.shipper import Shipper
from proxy.receipts.sqlite import SqliteReceiptStore

from receipts_fakes import make_receipt


async def test_route_and_avoided_grams_ship_into_a_table_made_before_them(tmp_path: Path, dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:  # the table as the first fleet version created it
        await conn.execute(pg_schema.CREATE)
        await conn.execute("ALTER TABLE carbon_receipts DROP COLUMN route, DROP COLUMN avoided_grams")
    finally:
        await conn.close()
    path = str(tmp_path / "outbox.db")
    store = SqliteReceiptStore(path, outbox=True)
    postgres = Postgres(dsn, timeout_seconds=2.0)
    shipper = Shipper(path, postgres, "replica-a", idle_seconds=0.05)
    await store.start()
    await shipper.start()
    try:
        receipt = make_receipt("routed", receipt_id="id-routed")
        receipt.route = "upstream=nordic; avoided_grams=0.25; counterfactual=predicted"
        receipt.avoided_grams = 0.25
        store.put(receipt)
        deadline = time.monotonic() + 20
        while shipper.shipped_total < 1:
            assert time.monotonic() < deadline, "not shipped"
            await asyncio.sleep(0.05)
    finally:
        await store.close()
        await shipper.close()
        await postgres.close()
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT route, avoided_grams FROM carbon_receipts WHERE receipt_id = 'id-routed'")
    finally:
        await conn.close()
    assert row["avoided_grams"] == 0.25 and row["route"].startswith("upstream=nordic")
    report = await asyncio.to_thread(
        build_fleet_report, dsn, since_unix=time.time() - 86400, until_unix=time.time() + 60, by="upstream"
    )
    assert report.total.avoided_grams == 0.25  # the fleet report's column
