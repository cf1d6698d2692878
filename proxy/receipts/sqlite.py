"""SqliteReceiptStore: durable receipts in SQLite (WAL), written in batches off the event loop.

- put() runs on the event loop: it snapshots the receipt as a row tuple into a dict keyed
  by receipt id, under a lock held for a dict assignment. A provisional row still queued
  is simply replaced by its final one.
- One writer thread owns the write connection. It takes everything queued and upserts it
  in one transaction, so batches grow with the load instead of commits multiplying.
- Group commit: `written(receipt_id)` lets a response wait for its batch to commit
  before its last bytes go out, so a completed response has a durable receipt. The wait
  is bounded, and skipped while the store is failing: storage never holds a request.
- Failure (disk full, locked, unwritable directory): the batch goes back to the queue,
  the error is logged once and counted, and the writer retries with backoff.
- Poison: a row that can never be written (a value SQLite cannot bind, such as text that
  is not UTF-8) fails its batch with a non-transient error. The batch is then retried row
  by row: the poison row is logged (first one, with the reason), counted and dropped; the
  rest are written. No row can stop the writer.
- A writer that stopped anyway (a bug) is visible: `writer_up` turns false (readiness
  and metrics show it), responses stop waiting for commits, and close() logs how many
  receipts were lost. The queue
  is bounded (max_pending): past it, receipts of new requests are dropped and counted;
  updates of queued ones are always taken, since they add nothing.
- Housekeeping on the writer thread: rows left provisional by a crashed process are
  settled at open; retention purge and size cap run periodically.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import sqlite3
import threading
import time
from typing import Sequence

from proxy.receipts import schema
from proxy.receipts.model import FIELD_NAMES, Receipt, ReceiptQuery, matches

log = logging.getLogger("carbon_proxy.receipts")

_row_of = operator.attrgetter(*FIELD_NAMES)
_CREDENTIAL = FIELD_NAMES.index("credential_hash")
_STARTED = FIELD_NAMES.index("started_unix")
_STATUS = FIELD_NAMES.index("status")
_REQUEST_ID = FIELD_NAMES.index("request_id")
Row = tuple[object, ...]

SIZE_CHECK_ROWS = 20_000
"""With a size cap, check the file size at least this often (in rows written), so the
cap holds between maintenance ticks at high rates."""
FIRST_RETRY_SECONDS = 0.05
CHECKPOINT_INTERVAL_SECONDS = 1.0
CLOSE_ATTEMPTS = 3
REOPEN_AFTER_FAILURES = 5
"""Consecutive failed writes after which the connection is replaced (a broken handle,
a file replaced underneath), in case retrying on the same one cannot succeed."""


class SqliteReceiptStore:
    def __init__(
        self,
        path: str,
        *,
        retention_days: float = 90,
        max_mb: float | None = None,
        max_pending: int = 100_000,
        busy_timeout_ms: int = 2_000,
        maintenance_interval_seconds: float = 60.0,
        retry_max_seconds: float = 5.0,
        outbox: bool = False,
    ) -> None:
        self.path = path
        self.outbox = outbox
        """Queue every receipt written for a shipper (proxy.receipts.shipper)."""
        self.retention_days = retention_days
        self.max_bytes = int(max_mb * 1024 * 1024) if max_mb else None
        self.max_pending = max_pending
        self._busy_timeout_ms = busy_timeout_ms
        self._maintenance_interval = maintenance_interval_seconds
        self._retry_max = retry_max_seconds
        self._cond = threading.Condition(threading.Lock())
        self._pending: dict[str, Row] = {}
        self._writing: dict[str, Row] = {}
        self._generation = 0
        """Number of the batch the queued rows will be written in."""
        self._waiters: dict[int, list[asyncio.Future[bool]]] = {}
        self._maintenance_waiters: list[asyncio.Future[None]] = []
        self._maintenance_requested = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opened = threading.Event()
        self._settled = False
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._full_logged = False
        self._failing_logged = False
        # Counters for metrics (monotonic) and state (gauges).
        self.written_total = 0
        self.batches_total = 0
        self.dropped_total = 0
        self.write_errors_total = 0
        self.conflicts_total = 0
        self.commit_wait_timeouts_total = 0
        self.settled_at_restart = 0
        self.purged_total = 0
        self.poison_total = 0
        self._poison_logged = False
        self._crashed = False
        self.healthy = False
        self.last_error: str | None = None

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._writing)

    @property
    def writer_up(self) -> bool:
        """True while the writer thread runs (false before start, after close, and if it died)."""
        return self._thread is not None and self._thread.is_alive() and not self._crashed

    # -- event loop side --------------------------------------------------------------

    async def start(self) -> None:
        """Open the database on the writer thread. Never raises: an unusable path is
        logged and retried, and receipts wait in the (bounded) queue meanwhile."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run_guarded, name="receipts-writer", daemon=True)
        self._thread.start()
        self._checkpointer = threading.Thread(target=self._checkpoints, name="receipts-checkpoint", daemon=True)
        self._checkpointer.start()
        # Wait for the first open attempt, so budgets can reload usage from the file.
        await asyncio.to_thread(self._opened.wait, 10.0)

    def put(self, receipt: Receipt) -> None:
        row: Row = _row_of(receipt)  # a snapshot: the exchange mutates its receipt later
        key = receipt.receipt_id
        with self._cond:
            queued = self._pending.get(key)
            if queued is not None:
                if queued[_CREDENTIAL] != row[_CREDENTIAL] or queued[_STARTED] != row[_STARTED]:
                    self.conflicts_total += 1  # receipt ids are the proxy's own: never expected
                    return
                if queued[_STATUS] == "final" and row[_STATUS] != "final":
                    return
            elif len(self._pending) + len(self._writing) >= self.max_pending:
                self.dropped_total += 1
                if not self._full_logged:
                    self._full_logged = True
                    log.error("receipt queue full (%d): dropping new receipts until the database catches up", self.max_pending)
                return
            self._pending[key] = row
            if len(self._pending) == 1:
                self._cond.notify()

    async def get(self, receipt_id: str) -> Receipt | None:
        with self._cond:
            row = self._pending.get(receipt_id) or self._writing.get(receipt_id)
        if row is not None:
            return Receipt(*row)
        found = await asyncio.to_thread(self._read_one, receipt_id)
        return Receipt(*found) if found is not None else None

    async def find(self, credential_hash: str | None, request_id: str, limit: int) -> list[Receipt]:
        with self._cond:  # queued rows are usually a handful (more only while the disk fails)
            queued = [
                row for row in (*self._pending.values(), *self._writing.values())
                if row[_REQUEST_ID] == request_id and row[_CREDENTIAL] == credential_hash
            ]  # fmt: skip
        try:
            stored = await asyncio.to_thread(self._query, schema.FIND_SQL, (credential_hash, request_id, limit))
        except sqlite3.Error:
            if not queued:
                raise
            stored = []  # the file is unreadable (an outage): what is queued is still an answer
        return _merged(queued, stored, key=lambda r: (r.started_unix, r.receipt_id), reverse=True, limit=limit)

    async def list(self, query: ReceiptQuery) -> list[Receipt]:
        with self._cond:
            queued = [row for row in (*self._pending.values(), *self._writing.values()) if matches(Receipt(*row), query)]
        params: list[object] = [query.credential_hash, query.after or ""]
        params += [p for p in (query.since_unix, query.until_unix) if p is not None]
        sql = schema.list_sql(query.since_unix is not None, query.until_unix is not None)
        stored = await asyncio.to_thread(self._query, sql, [*params, query.limit])
        return _merged(queued, stored, key=lambda r: r.receipt_id, reverse=False, limit=query.limit)

    async def written(self, receipt_id: str, timeout_seconds: float) -> bool:
        assert self._loop is not None, "SqliteReceiptStore.start() was not awaited"
        with self._cond:
            if receipt_id in self._pending:
                generation = self._generation
            elif receipt_id in self._writing:
                generation = self._generation - 1
            else:
                return True
            if not self.healthy or timeout_seconds <= 0 or not self.writer_up:
                return False
            future: asyncio.Future[bool] = self._loop.create_future()
            self._waiters.setdefault(generation, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout_seconds)
        except TimeoutError:
            self.commit_wait_timeouts_total += 1
            return False

    async def tenant_usage_grams(
        self, periods: Sequence[str], tenants: Sequence[str] | None = None
    ) -> dict[tuple[str, str], float]:
        return await asyncio.to_thread(self._read_usage, list(periods), None if tenants is None else list(tenants))

    async def maintain(self) -> None:
        """Run retention and the size cap now (tests, or after changing the config)."""
        assert self._loop is not None, "SqliteReceiptStore.start() was not awaited"
        future: asyncio.Future[None] = self._loop.create_future()
        with self._cond:
            self._maintenance_waiters.append(future)
            self._maintenance_requested = True
            self._cond.notify()
        await future

    async def close(self) -> None:
        """Write everything queued (a few tries), then close the connections."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)
        if self._crashed:
            with self._cond:
                lost = len(self._pending) + len(self._writing)
                self._pending, self._writing = {}, {}
            if lost:
                self.dropped_total += lost
                log.error("receipts: %d receipt(s) could not be written: the writer had stopped (%s)", lost, self.last_error)
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join, 30.0)
        self._release_all()
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def _release(self, generation: int, ok: bool) -> None:
        with self._cond:
            done = [g for g in self._waiters if g <= generation]
            futures = [f for g in done for f in self._waiters.pop(g)]
        for future in futures:
            if not future.done():
                future.set_result(ok)

    def _release_all(self) -> None:
        with self._cond:
            futures = [f for fs in self._waiters.values() for f in fs]
            self._waiters.clear()
            maintenance, self._maintenance_waiters = self._maintenance_waiters, []
        for future in futures:
            if not future.done():
                future.set_result(False)
        for done in maintenance:
            if not done.done():
                done.set_result(None)

    def _call_on_loop(self, callback: object, *args: object) -> None:
        try:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(callback, *args)  # type: ignore[arg-type]
        except RuntimeError:
            pass  # the loop is gone (shutdown): nobody is waiting any more

    # -- writer thread ----------------------------------------------------------------

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a bug: say so where operators look, never silently
            self._crashed = True
            self.healthy = False
            self.last_error = f"the writer stopped on {type(exc).__name__}"
            log.critical("receipts: the writer thread stopped (%s); receipts are no longer written", type(exc).__name__, exc_info=True)
            self._call_on_loop(self._release_all)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        retry = FIRST_RETRY_SECONDS
        failed_attempts = 0
        next_maintenance = 0.0
        rows_since_size_check = 0
        while True:
            if conn is None:
                conn = self._open()
                self._opened.set()
                if conn is None:
                    failed_attempts += 1
                    if self._closing and failed_attempts >= CLOSE_ATTEMPTS:
                        break
                    retry = self._pause(retry)
                    continue
                retry, failed_attempts = FIRST_RETRY_SECONDS, 0
            with self._cond:
                while not (self._pending or self._closing or self._maintenance_requested):
                    wait = next_maintenance - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                batch, self._pending = self._pending, {}
                self._writing = batch
                generation = self._generation
                self._generation += 1
            if batch:
                ok = self._write(conn, batch)
                with self._cond:
                    self._writing = {}
                    if not ok:  # back in the queue, under anything newer
                        batch.update(self._pending)
                        self._pending = batch
                    elif self._full_logged and len(self._pending) < self.max_pending // 2:
                        self._full_logged = False
                    waited = any(g <= generation for g in self._waiters)
                if waited:
                    self._call_on_loop(self._release, generation, ok)
                if not ok:
                    failed_attempts += 1
                    if self._closing and failed_attempts >= CLOSE_ATTEMPTS:
                        break
                    if failed_attempts % REOPEN_AFTER_FAILURES == 0:
                        conn.close()
                        conn = None
                    retry = self._pause(retry)
                    continue
                retry, failed_attempts = FIRST_RETRY_SECONDS, 0
                rows_since_size_check += len(batch)
            size_due = self.max_bytes is not None and rows_since_size_check >= SIZE_CHECK_ROWS
            if self._maintenance_requested or size_due or time.monotonic() >= next_maintenance:
                more = self._maintain(conn)
                rows_since_size_check = 0
                next_maintenance = time.monotonic() + (0.0 if more else self._maintenance_interval)
            if self._closing and not self._pending:
                break
        with self._cond:
            lost = len(self._pending)
            self._pending = {}
        if lost:
            self.dropped_total += lost
            log.error("receipts: %d receipt(s) could not be written before shutdown (%s)", lost, self.last_error)
        if conn is not None:
            try:  # leave a compact file behind: everything in the database, an empty WAL
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error:
                pass
            conn.close()

    def _checkpoints(self) -> None:
        """Checkpoints on their own thread and connection: the fsync they need never sits
        in a commit that responses are waiting for (the writer has autocheckpoint off)."""
        conn: sqlite3.Connection | None = None
        while not self._stop_checkpoints.wait(CHECKPOINT_INTERVAL_SECONDS):
            if not self.healthy:
                continue  # nothing new was committed, and opening could create the file early
            try:
                if conn is None:
                    conn = schema.connect(self.path, busy_timeout_ms=self._busy_timeout_ms)
                schema.checkpoint(conn)
            except sqlite3.Error as exc:
                log.debug("receipts checkpoint failed: %s", exc)  # the writer reports real trouble
                if conn is not None:
                    conn.close()
                    conn = None
        if conn is not None:
            conn.close()

    def _pause(self, seconds: float) -> float:
        """Back off after a failure (cut short by close); returns the next backoff."""
        with self._cond:
            if not self._closing:
                self._cond.wait(seconds)
        return min(seconds * 2, self._retry_max)

    def _open(self) -> sqlite3.Connection | None:
        conn: sqlite3.Connection | None = None
        try:
            conn = schema.connect(self.path, busy_timeout_ms=self._busy_timeout_ms, autocheckpoint=False)
            schema.create_schema(conn)
            schema.set_outbox(conn, self.outbox)
            # Only before this process has written anything: later reopens would settle
            # its own receipts that are still waiting for their final figures.
            settled = 0 if self._settled else schema.settle_provisional(conn)
            self._settled = True
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            self._failed(f"cannot open {self.path}: {exc}")
            return None
        if settled:
            self.settled_at_restart += settled
            log.warning("receipts: %d receipt(s) left provisional by a previous run settled as final (settled=restart)", settled)
        self._recovered()
        return conn

    def _write(self, conn: sqlite3.Connection, batch: dict[str, Row]) -> bool:
        """Write the batch; False (the batch stays queued) on a transient failure. Poison
        rows are removed from `batch` and dropped."""
        try:
            schema.upsert(conn, list(batch.values()))
        except Exception as exc:
            if not _transient(exc):
                return self._write_row_by_row(conn, batch)
            self.write_errors_total += 1
            self._failed(f"writing {len(batch)} receipt(s) to {self.path} failed: {exc}")
            return False
        self.written_total += len(batch)
        self.batches_total += 1
        self._recovered()
        return True

    def _write_row_by_row(self, conn: sqlite3.Connection, batch: dict[str, Row]) -> bool:
        """A batch failed on its data: find the row(s) that can never be written."""
        written = 0
        for key, row in list(batch.items()):
            try:
                schema.upsert(conn, [row])
            except Exception as exc:
                if _transient(exc):  # the database itself failed meanwhile: retry later
                    self.written_total += written
                    self.write_errors_total += 1
                    self._failed(f"writing receipts to {self.path} failed: {exc}")
                    return False
                del batch[key]
                self._poison(key, row, exc)
                continue
            written += 1
        self.written_total += written
        self.batches_total += 1
        self._recovered()
        return True

    def _poison(self, key: str, row: Row, exc: Exception) -> None:
        self.poison_total += 1
        if self._poison_logged:  # counted in the metrics; one line is enough to find the cause
            log.debug("receipts: dropped unwritable receipt %.128r (%s)", key, type(exc).__name__)
            return
        self._poison_logged = True
        log.error(
            "receipts: dropped receipt %.128r: it cannot be stored (%s%s); later ones are only counted "
            "(carbon_proxy_receipts_poison_total)",
            key, type(exc).__name__, _bad_column(row),
        )  # fmt: skip

    def _maintain(self, conn: sqlite3.Connection) -> bool:
        """Retention purge (a chunk) and size cap. True when more expired rows remain."""
        more = False
        try:
            purged, more = schema.purge_expired(conn, self.retention_days)
            if self.max_bytes is not None:
                purged += schema.trim_to_size(conn, self.max_bytes)
            self.purged_total += purged
        except sqlite3.Error as exc:
            self._failed(f"receipts housekeeping failed: {exc}")
        with self._cond:
            self._maintenance_requested = more and self._maintenance_requested
            if not more:
                waiters, self._maintenance_waiters = self._maintenance_waiters, []
                for future in waiters:
                    self._call_on_loop(_resolve, future)
        return more

    def _failed(self, message: str) -> None:
        self.healthy = False
        self.last_error = message
        if not self._failing_logged:  # once per outage, not once per retry
            self._failing_logged = True
            log.error("receipts: %s; requests are served, receipts are kept in memory and retried", message)

    def _recovered(self) -> None:
        if self._failing_logged:
            self._failing_logged = False
            log.warning("receipts: the database at %s is writable again", self.path)
        self.healthy = True

    # -- readers (to_thread workers) ----------------------------------------------------

    def _reader_conn(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = schema.connect(self.path, busy_timeout_ms=self._busy_timeout_ms, read_only=True)
        return self._reader

    def _query(self, sql: str, params: Sequence[object]) -> list[Row]:
        with self._read_lock:
            try:
                return self._reader_conn().execute(sql, params).fetchall()
            except sqlite3.Error:
                if self._reader is not None:  # reopen next time (file replaced, I/O error)
                    self._reader.close()
                    self._reader = None
                raise

    def _read_one(self, receipt_id: str) -> Row | None:
        rows = self._query(schema.SELECT_ONE_SQL, (receipt_id,))
        return rows[0] if rows else None

    def _read_usage(self, periods: list[str], tenants: list[str] | None) -> dict[tuple[str, str], float]:
        if not periods or tenants == []:
            return {}
        sql = f"SELECT tenant, period, co2e_grams FROM tenant_usage WHERE period IN ({', '.join('?' * len(periods))})"
        params: list[object] = list(periods)
        if tenants is not None:
            sql += f" AND tenant IN ({', '.join('?' * len(tenants))})"
            params += tenants
        rows = self._query(sql, params)
        return {(str(tenant), str(period)): float(grams) for tenant, period, grams in rows}  # type: ignore[arg-type]


def _transient(exc: BaseException) -> bool:
    """Errors of the database itself (locked, full, I/O, not a database): retrying the same
    rows later can succeed. Anything else (binding, encoding, constraints) is the data."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def _bad_column(row: Row) -> str:
    """Which column holds text that is not UTF-8 (named, never shown: it may be a secret)."""
    for name, value in zip(FIELD_NAMES, row):
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return f" in column {name}: not UTF-8 text"
    return ""


def _merged(queued: list[Row], stored: list[Row], *, key: object, reverse: bool, limit: int) -> list[Receipt]:
    """Rows from the queue and the file, one receipt per id (the queued one is newer)."""
    by_id = {row[0]: row for row in stored}
    by_id.update((row[0], row) for row in queued)
    receipts = [Receipt(*row) for row in by_id.values()]
    receipts.sort(key=key, reverse=reverse)  # type: ignore[arg-type]
    return receipts[:limit]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
