"""Receipts written per second through SqliteReceiptStore (goal: >= 5,000/s).

Each simulated request records two receipts, as the proxy does: provisional when the
response ends, final when attribution settles. Three figures:

1. burst: N requests recorded as fast as the event loop can, until all are on disk;
   requests per second = N / elapsed.
2. paced: a steady RATE requests/s for a few seconds, each response waiting for its
   group commit (what `commit_wait_ms` does in the proxy): p50/p99 of that wait, and drops.
3. event-loop cost of one put() (microseconds): what the request path pays.

4. with --postgres (a throwaway cluster from /usr/lib/postgresql/*/bin, or --dsn URL):
   receipts per second shipped from the outbox to PostgreSQL, and the paced phase again
   with the outbox and shipper running: the group-commit wait beside SQLite alone (the
   request path never waits for PostgreSQL; this shows what the outbox triggers add).

    .venv/bin/python bench/receipts.py [--requests 100000] [--rate 5000] [--seconds 5] [--postgres | --dsn URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from proxy.receipts.model import Receipt
from proxy.receipts.postgres import Postgres
from proxy.receipts.shipper import Shipper
from proxy.receipts.sqlite import SqliteReceiptStore


def receipt(i: int, started_unix: float) -> Receipt:
    return Receipt(
        receipt_id=f"rct-{i:09d}", request_id=f"req-{i:09d}", credential_hash="3f" * 32, tenant=f"team-{i % 7}", upstream="llama", model="llama-3-8b",
        dialect="openai", method="POST", path="/v1/chat/completions", status_code=200, outcome="ok", started_unix=started_unix,
        duration_seconds=0.8, time_to_first_byte_seconds=0.05, prompt_tokens=420, output_tokens=180, work_units=None, images=0,
        energy_joules=61.5, pue=1.2, intensity_g_per_kwh=380.0, operational_grams=0.0078, embodied_grams=0.0011,
        co2e_grams=0.0089, basis="meter=nvml; intensity=electricitymaps:DE; pue=1.2; status=provisional", status="provisional",
    )  # fmt: skip


def settle(r: Receipt) -> None:
    r.energy_joules *= 1.03
    r.co2e_grams *= 1.03
    r.status = "final"
    r.basis = r.basis.replace("status=provisional", "status=final")


async def burst(path: str, requests: int) -> tuple[float, SqliteReceiptStore]:
    store = SqliteReceiptStore(path)
    await store.start()
    now = time.time()
    started = time.perf_counter()
    pending_final: list[Receipt] = []
    for i in range(requests):
        r = receipt(i, now)
        store.put(r)
        pending_final.append(r)
        if len(pending_final) >= 200:  # attribution settles a sample period later
            for done in pending_final:
                settle(done)
                store.put(done)
            pending_final.clear()
            # A tight loop makes receipts faster than any disk: hold back at half the
            # queue bound rather than measure drops (a proxy does real work per request).
            await asyncio.sleep(0.001 if store.pending > store.max_pending // 2 else 0)
    for done in pending_final:
        settle(done)
        store.put(done)
    while store.pending:
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - started
    await store.close()
    return elapsed, store


async def paced(
    path: str | None, rate: float, seconds: float, dsn: str | None = None
) -> tuple[list[float], SqliteReceiptStore | None, int]:
    """path None: the same load without a store, timing a bare yield to the event loop
    (the baseline: how late the loop itself runs a ready task at this load). dsn: with
    the outbox, and a shipper to that PostgreSQL running alongside."""
    store = SqliteReceiptStore(path, outbox=dsn is not None) if path is not None else None
    shipper = None
    if store is not None:
        await store.start()
        if dsn is not None and path is not None:
            shipper = Shipper(path, Postgres(dsn), "bench")
            await shipper.start()
    waits: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    base = 10**8

    async def one(i: int) -> None:
        r = receipt(base + i, time.time())
        t0 = time.perf_counter()
        if store is None:
            await asyncio.sleep(0)
        else:
            store.put(r)
            await store.written(r.receipt_id, 2.0)
        waits.append(time.perf_counter() - t0)
        await asyncio.sleep(0.1)  # the meter's next sample
        settle(r)
        if store is not None:
            store.put(r)

    loop = asyncio.get_running_loop()
    start = loop.time()
    total = int(rate * seconds)
    for i in range(total):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    if store is not None:
        await store.close()
    if shipper is not None:
        await shipper.close(drain_seconds=30)
        await shipper.postgres.close()
    return waits, store, total


async def shipped_per_second(path: str, dsn: str, requests: int) -> tuple[float, int]:
    """Write `requests` final receipts to the outbox first, then time the shipper draining
    it into PostgreSQL (a backlog after an outage is the worst case)."""
    store = SqliteReceiptStore(path, outbox=True)
    await store.start()
    now = time.time()
    for i in range(requests):
        r = receipt(i, now)
        settle(r)
        store.put(r)
        if store.pending > store.max_pending // 2:
            await asyncio.sleep(0.001)
    while store.pending:
        await asyncio.sleep(0.001)
    await store.close()
    postgres = Postgres(dsn)
    shipper = Shipper(path, postgres, "bench", batch_rows=2000)
    started = time.perf_counter()
    while await shipper.ship_once():
        pass
    elapsed = time.perf_counter() - started
    await shipper.close()
    await postgres.close()
    return elapsed, shipper.shipped_total


def _ms(values: list[float], quantile: float) -> str:
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(len(ordered) * quantile))] * 1000:.2f} ms"


def put_cost_microseconds(path: str, n: int = 50_000) -> float:
    store = SqliteReceiptStore(path)  # never started: put() alone, no writer competing for the GIL
    rs = [receipt(i, time.time()) for i in range(n)]
    started = time.perf_counter()
    for r in rs:
        store.put(r)
    return (time.perf_counter() - started) / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=5_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--dir", default=None, help="directory for the database (default: a temp dir)")
    parser.add_argument("--postgres", action="store_true", help="also ship to a throwaway PostgreSQL cluster")
    parser.add_argument("--dsn", default=None, help="also ship to this PostgreSQL (instead of a throwaway cluster)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"sqlite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, database in {tmp}")
        elapsed, store = await burst(str(Path(tmp) / "burst.db"), args.requests)
        size_mb = sum(f.stat().st_size for f in Path(tmp).glob("burst.db*")) / 1e6
        print(
            f"burst:  {args.requests} requests (2 receipts each) on disk in {elapsed:.2f} s = {args.requests / elapsed:,.0f} requests/s, "
            f"{store.written_total / elapsed:,.0f} row upserts/s in {store.batches_total} transactions "
            "(a provisional still queued when its final comes is replaced, not written twice); "
            f"dropped {store.dropped_total}; {size_mb:.1f} MB"
        )
        lag, _, _ = await paced(None, args.rate, args.seconds)
        waits, paced_store, total = await paced(str(Path(tmp) / "paced.db"), args.rate, args.seconds)
        assert paced_store is not None
        print(
            f"paced:  {total} requests at {args.rate:,.0f}/s: group-commit wait p50 {_ms(waits, 0.5)}, p99 {_ms(waits, 0.99)} "
            f"(event-loop lag at this load without a store: p50 {_ms(lag, 0.5)}, p99 {_ms(lag, 0.99)}); "
            f"{paced_store.written_total} row upserts in {paced_store.batches_total} transactions; dropped {paced_store.dropped_total}; "
            f"wait timeouts {paced_store.commit_wait_timeouts_total}"
        )
        print(f"put():  {put_cost_microseconds(str(Path(tmp) / 'put.db')):.2f} us on the event loop per receipt")
        if args.postgres or args.dsn:
            await postgres_phases(args, tmp, waits)


async def postgres_phases(args: argparse.Namespace, tmp: str, sqlite_waits: list[float]) -> None:
    cluster = None
    dsn = args.dsn
    if dsn is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from fleet.pg import Cluster, find_bin_dir  # the tests' throwaway cluster

        bin_dir = find_bin_dir()
        if bin_dir is None:
            print("postgres: no PostgreSQL under /usr/lib/postgresql/*/bin (Debian package 'postgresql'); skipped")
            return
        cluster = Cluster(bin_dir)
        cluster.init()
        cluster.start()
        dsn = cluster.dsn()
    try:
        elapsed, shipped = await shipped_per_second(str(Path(tmp) / "ship.db"), dsn, args.requests)
        print(f"ship:   {shipped} receipts from the outbox to PostgreSQL in {elapsed:.2f} s = {shipped / elapsed:,.0f} receipts/s")
        waits, store, total = await paced(str(Path(tmp) / "paced-pg.db"), args.rate, args.seconds, dsn=dsn)
        assert store is not None
        print(
            f"paced+postgres: {total} requests at {args.rate:,.0f}/s with the outbox and shipper running: group-commit wait "
            f"p50 {_ms(waits, 0.5)}, p99 {_ms(waits, 0.99)} (SQLite alone above: p50 {_ms(sqlite_waits, 0.5)}, "
            f"p99 {_ms(sqlite_waits, 0.99)}); dropped {store.dropped_total}"
        )
    finally:
        if cluster is not None:
            cluster.destroy()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
