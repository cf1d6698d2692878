"""Ship receipts from the local SQLite outbox to the fleet's PostgreSQL, off the request path.

The local file stays the durable record: a receipt is on local disk before its response
ends (the SQLite store's group commit), and triggers queue it in `outbox` in the same
transaction. This task reads the oldest queued receipts, upserts them to PostgreSQL in
one statement, and only then deletes them from the outbox. So:
- an outage or a restart loses nothing: the outbox keeps them, and shipping resumes
  from it (a backlog drains in batches of `batch_rows`);
- a crash between PostgreSQL's commit and the outbox delete ships a batch again, and the
  upsert on (receipt_id, started_at) makes that a no-op: nothing is doubled;
- no request ever waits for PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time

from proxy.receipts import schema
from proxy.receipts.postgres import Postgres, PostgresUnavailable

log = logging.getLogger("carbon_proxy.shipper")

FIRST_RETRY_SECONDS = 0.1


class Shipper:
    def __init__(
        self,
        path: str,
        postgres: Postgres,
        replica: str,
        *,
        retention_days: float = 90,
        batch_rows: int = 1000,
        idle_seconds: float = 0.1,
        retry_max_seconds: float = 5.0,
    ) -> None:
        self.path = path
        self.postgres = postgres
        self.replica = replica
        self.retention_days = retention_days
        self.batch_rows = batch_rows
        self._idle = idle_seconds
        self._retry_max = retry_max_seconds
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.shipped_total = 0
        self.batches_total = 0
        self.failures_total = 0
        self.backlog = 0
        """Receipts queued in the outbox at the last look."""
        self.last_shipped_unix: float | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="receipts-shipper")

    async def close(self, drain_seconds: float = 5.0) -> None:
        """Ship what is queued (up to drain_seconds), then stop. What is left stays in
        the outbox for the next start."""
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, drain_seconds)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
            self._task = None
        await asyncio.to_thread(self._close_conn)

    async def ship_once(self) -> int:
        """Ship one batch; the receipts shipped (0: nothing queued). Raises PostgresUnavailable."""
        seqs, rows = await asyncio.to_thread(self._read, self.batch_rows)
        if not seqs:
            self.backlog = 0
            return 0
        if rows:
            await self.postgres.upsert(rows, self.replica)
        await asyncio.to_thread(self._done, seqs)  # only after PostgreSQL committed
        self.shipped_total += len(rows)
        self.batches_total += 1
        self.last_shipped_unix = time.time()
        return len(seqs)

    async def _run(self) -> None:
        retry = FIRST_RETRY_SECONDS
        while True:
            try:
                shipped = await self.ship_once()
                retry = FIRST_RETRY_SECONDS
                if shipped < self.batch_rows:
                    if self._stop.is_set():
                        return  # drained
                    await self._retention()
                    await self._wait(self._idle)
            except (PostgresUnavailable, sqlite3.Error, OSError) as exc:
                self.failures_total += 1
                log.debug("shipping receipts failed (%s); retrying in %.1f s", exc, retry)
                self._close_conn_on_sqlite_error(exc)
                if self._stop.is_set():
                    return  # shutting down: the outbox keeps the rest for the next start
                await self._wait(retry)
                retry = min(retry * 2, self._retry_max)

    async def _retention(self) -> None:
        try:
            await self.postgres.drop_expired(self.retention_days)
        except PostgresUnavailable:
            pass  # tried again on the next idle turn

    async def _wait(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # -- SQLite side (worker threads) -----------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = schema.connect(self.path, busy_timeout_ms=2_000)
        return self._conn

    def _read(self, limit: int) -> tuple[list[int], list[tuple[object, ...]]]:
        with self._lock:
            conn = self._connection()
            try:
                seqs, rows = schema.outbox_batch(conn, limit)
            except sqlite3.OperationalError as exc:
                if "no such table: outbox" in str(exc):
                    return [], []  # the writer has not created it yet
                raise
            self.backlog = len(seqs) if len(seqs) < limit else schema.outbox_size(conn)
            return seqs, rows

    def _done(self, seqs: list[int]) -> None:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                schema.outbox_done(conn, seqs)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _close_conn_on_sqlite_error(self, exc: BaseException) -> None:
        if isinstance(exc, sqlite3.Error):
            self._close_conn()

    def _close_conn(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
