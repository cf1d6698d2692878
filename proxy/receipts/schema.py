"""The receipts database: schema, upsert, restart settling and housekeeping (SQL only).

Every function takes an open sqlite3 connection in autocommit mode and runs on the
store's writer thread (or a reader's own connection); none touches the event loop.

Tables:
- `receipts`: one row per request, keyed by the proxy-unique receipt_id; columns = the
  Receipt dataclass fields (the single definition; new fields become new columns on the
  next start). The client's request_id is a plain column, indexed per credential.
- `tenant_usage`: CO2e grams per tenant per budget period ('day:YYYY-MM-DD',
  'month:YYYY-MM', UTC by request start), kept by triggers in the same transaction as
  the receipt rows. Budgets reload from it after a restart; unlike a SUM over receipts
  it survives the retention purge and the size cap.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import fields
from itertools import chain
from typing import Sequence

from proxy.receipts.model import FIELD_NAMES, Receipt

SECONDS_PER_DAY = 86_400.0
PURGE_CHUNK_ROWS = 5_000
"""Rows deleted per transaction, so a large purge never holds the write lock for long."""
WAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024
"""The WAL file is truncated back to this after checkpoints (it is outside max_mb)."""
SETTLED_AT_RESTART = "settled=restart"
SCHEMA_VERSION = 2
"""PRAGMA user_version. 1 (or 0): receipts keyed by the client's request_id. 2: keyed by
receipt_id; opening a version-1 file migrates it (old rows get receipt_id = request_id)."""


def _sql_type(annotation: object) -> str:
    text = str(annotation)
    if text.startswith("int"):
        return "INTEGER"
    if text.startswith("float"):
        return "REAL"
    return "TEXT"


COLUMN_TYPES: dict[str, str] = {f.name: _sql_type(f.type) for f in fields(Receipt)}
_COLUMNS = ", ".join(FIELD_NAMES)
_UPDATES = ", ".join(f"{name} = excluded.{name}" for name in FIELD_NAMES if name != "receipt_id")

ROWS_PER_STATEMENT = 128
"""Rows per multi-row INSERT. One statement is one step of the SQLite VM, during which
the writer thread holds no GIL: per-row steps (executemany) would make it wait for the
GIL once per row while the event loop is busy, and group commits would take tens of ms.
Every size up to this one stays in the connection's statement cache."""
_ONE_ROW = f"({', '.join('?' * len(FIELD_NAMES))})"
_UPSERT_TAIL = (
    f" ON CONFLICT(receipt_id) DO UPDATE SET {_UPDATES} "
    # provisional -> final, never back; and only the same request (same credential, same
    # start) may update a row (receipt ids are the proxy's own; this is a second fence).
    "WHERE (receipts.status <> 'final' OR excluded.status = 'final') "
    "AND receipts.credential_hash IS excluded.credential_hash AND receipts.started_unix = excluded.started_unix"
)
_UPSERTS: dict[int, str] = {}


def upsert_sql(rows: int) -> str:
    """INSERT .. VALUES (..), (..) .. ON CONFLICT(receipt_id) DO UPDATE, for `rows` rows."""
    sql = _UPSERTS.get(rows)
    if sql is None:
        sql = _UPSERTS[rows] = f"INSERT INTO receipts ({_COLUMNS}) VALUES {', '.join([_ONE_ROW] * rows)}{_UPSERT_TAIL}"
    return sql


def upsert(conn: sqlite3.Connection, rows: Sequence[Sequence[object]]) -> None:
    """Write rows atomically: one statement (an implicit transaction) when they fit, else
    one explicit transaction of several."""
    if len(rows) <= ROWS_PER_STATEMENT:
        conn.execute(upsert_sql(len(rows)), list(chain.from_iterable(rows)))
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            chunk = rows[start : start + ROWS_PER_STATEMENT]
            conn.execute(upsert_sql(len(chunk)), list(chain.from_iterable(chunk)))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise

SELECT_ONE_SQL = f"SELECT {_COLUMNS} FROM receipts WHERE receipt_id = ?"
FIND_SQL = (
    f"SELECT {_COLUMNS} FROM receipts WHERE credential_hash IS ? AND request_id = ? "
    "ORDER BY started_unix DESC, receipt_id DESC LIMIT ?"
)


def list_sql(since: bool, until: bool) -> str:
    """A credential's receipts after a receipt id (the page cursor), oldest first."""
    where = "credential_hash IS ? AND receipt_id > ?"
    where += " AND started_unix >= ?" if since else ""
    where += " AND started_unix < ?" if until else ""
    return f"SELECT {_COLUMNS} FROM receipts WHERE {where} ORDER BY receipt_id LIMIT ?"


_DAY = "'day:' || strftime('%Y-%m-%d', NEW.started_unix, 'unixepoch')"
_MONTH = "'month:' || strftime('%Y-%m', NEW.started_unix, 'unixepoch')"
_TRIGGERS = f"""
CREATE TRIGGER IF NOT EXISTS receipts_usage_insert AFTER INSERT ON receipts BEGIN
    INSERT INTO tenant_usage (tenant, period, co2e_grams) VALUES (NEW.tenant, {_DAY}, NEW.co2e_grams)
        ON CONFLICT (tenant, period) DO UPDATE SET co2e_grams = co2e_grams + excluded.co2e_grams;
    INSERT INTO tenant_usage (tenant, period, co2e_grams) VALUES (NEW.tenant, {_MONTH}, NEW.co2e_grams)
        ON CONFLICT (tenant, period) DO UPDATE SET co2e_grams = co2e_grams + excluded.co2e_grams;
END;
CREATE TRIGGER IF NOT EXISTS receipts_usage_update AFTER UPDATE OF co2e_grams ON receipts
WHEN NEW.co2e_grams IS NOT OLD.co2e_grams BEGIN
    UPDATE tenant_usage SET co2e_grams = co2e_grams + NEW.co2e_grams - OLD.co2e_grams
        WHERE tenant = NEW.tenant AND period IN ({_DAY}, {_MONTH});
END;
"""


def connect(path: str, *, busy_timeout_ms: int, read_only: bool = False, autocheckpoint: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, synchronous=NORMAL:
    a commit survives a crash of the process; only a power loss may drop the last ones.
    `autocheckpoint=False`: this connection's commits never checkpoint (the only step
    that fsyncs); call `checkpoint` from another connection instead."""
    if read_only:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, cached_statements=ROWS_PER_STATEMENT + 16
        )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if not read_only:
        # auto_vacuum only takes effect on a new file: freed pages then go back to the
        # OS (incremental_vacuum), so the size cap bounds the file, not just the rows.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal" and path != ":memory:":
            raise sqlite3.OperationalError(f"cannot switch {path} to WAL (journal_mode={mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
        if not autocheckpoint:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


def checkpoint(conn: sqlite3.Connection) -> None:
    """Copy committed WAL frames into the database file without blocking the writer."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def create_schema(conn: sqlite3.Connection) -> None:
    columns = ", ".join(
        f"{name} {COLUMN_TYPES[name]}{' PRIMARY KEY' if name == 'receipt_id' else ''}" for name in FIELD_NAMES
    )
    conn.execute("BEGIN IMMEDIATE")
    try:
        existing = {row[1] for row in conn.execute("PRAGMA table_info(receipts)")}
        if existing and "receipt_id" not in existing:
            _migrate_to_receipt_ids(conn, columns, existing)
        conn.execute(f"CREATE TABLE IF NOT EXISTS receipts ({columns})")
        existing = {row[1] for row in conn.execute("PRAGMA table_info(receipts)")}
        for name in FIELD_NAMES:
            if name not in existing:  # a field added since the file was created
                conn.execute(f"ALTER TABLE receipts ADD COLUMN {name} {COLUMN_TYPES[name]}")
        conn.execute("CREATE INDEX IF NOT EXISTS receipts_started ON receipts (started_unix)")
        # Partial index: finding the rows to settle at restart stays cheap on a big table.
        conn.execute("CREATE INDEX IF NOT EXISTS receipts_provisional ON receipts (status) WHERE status = 'provisional'")
        # A client's own id is looked up, and receipts listed, within one credential.
        conn.execute("CREATE INDEX IF NOT EXISTS receipts_client_id ON receipts (credential_hash, request_id)")
        conn.execute("CREATE INDEX IF NOT EXISTS receipts_owner ON receipts (credential_hash, receipt_id)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS tenant_usage (tenant TEXT NOT NULL, period TEXT NOT NULL, "
            "co2e_grams REAL NOT NULL DEFAULT 0, PRIMARY KEY (tenant, period)) WITHOUT ROWID"
        )
        for statement in _TRIGGERS.split("END;"):
            if statement.strip():
                conn.execute(statement + "END;")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _migrate_to_receipt_ids(conn: sqlite3.Connection, columns: str, existing: set[str]) -> None:
    """Version 1 -> 2: rebuild the table keyed by receipt_id (SQLite cannot change a
    primary key in place); old rows keep their request_id as their receipt id. The usage
    triggers are dropped first, so the copy does not count the grams a second time."""
    conn.execute("DROP TRIGGER IF EXISTS receipts_usage_insert")
    conn.execute("DROP TRIGGER IF EXISTS receipts_usage_update")
    conn.execute(f"CREATE TABLE receipts_v2 ({columns})")
    kept = [name for name in FIELD_NAMES if name in existing]
    conn.execute(
        f"INSERT INTO receipts_v2 (receipt_id, {', '.join(kept)}) SELECT request_id, {', '.join(kept)} FROM receipts"
    )
    conn.execute("DROP TABLE receipts")  # its indexes go with it
    conn.execute("ALTER TABLE receipts_v2 RENAME TO receipts")


_OUTBOX = (
    "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, receipt_id TEXT NOT NULL UNIQUE)",
    # Delete then insert, not INSERT OR REPLACE: inside a trigger, the outer upsert's
    # conflict policy (ABORT) would override OR REPLACE.
    "CREATE TRIGGER IF NOT EXISTS receipts_outbox_insert AFTER INSERT ON receipts BEGIN "
    "DELETE FROM outbox WHERE receipt_id = NEW.receipt_id; INSERT INTO outbox (receipt_id) VALUES (NEW.receipt_id); END",
    "CREATE TRIGGER IF NOT EXISTS receipts_outbox_update AFTER UPDATE ON receipts BEGIN "
    "DELETE FROM outbox WHERE receipt_id = NEW.receipt_id; INSERT INTO outbox (receipt_id) VALUES (NEW.receipt_id); END",
)
OUTBOX_BATCH_SQL = (
    f"SELECT o.seq, {', '.join('r.' + name for name in FIELD_NAMES)} FROM outbox o "
    "LEFT JOIN receipts r ON r.receipt_id = o.receipt_id ORDER BY o.seq LIMIT ?"
)


def set_outbox(conn: sqlite3.Connection, enabled: bool) -> None:
    """With a fleet database, every receipt written (new, or updated to final) is queued
    in `outbox` by triggers, in the same transaction: the shipper sends what is queued and
    deletes it after PostgreSQL committed it. AUTOINCREMENT: a receipt queued again gets a
    new, larger seq, so deleting the seqs just shipped never drops its newer version.
    Without one, the triggers and the table go (nothing would drain them)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if enabled:
            for statement in _OUTBOX:
                conn.execute(statement)
        else:
            conn.execute("DROP TRIGGER IF EXISTS receipts_outbox_insert")
            conn.execute("DROP TRIGGER IF EXISTS receipts_outbox_update")
            conn.execute("DROP TABLE IF EXISTS outbox")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def outbox_batch(conn: sqlite3.Connection, limit: int) -> tuple[list[int], list[tuple[object, ...]]]:
    """(every seq read, the receipt rows still present) of the oldest queued receipts. A
    receipt deleted since (retention, size cap) has no row: its seq is just dropped."""
    seqs: list[int] = []
    rows: list[tuple[object, ...]] = []
    for seq, *row in conn.execute(OUTBOX_BATCH_SQL, (limit,)):
        seqs.append(seq)
        if row[0] is not None:
            rows.append(tuple(row))
    return seqs, rows


def outbox_done(conn: sqlite3.Connection, seqs: Sequence[int]) -> None:
    for start in range(0, len(seqs), 500):
        chunk = seqs[start : start + 500]
        conn.execute(f"DELETE FROM outbox WHERE seq IN ({', '.join('?' * len(chunk))})", list(chunk))


def outbox_size(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])


def settle_provisional(conn: sqlite3.Connection) -> int:
    """Rows a previous process left provisional become final with the figures they have.

    Their attribution state died with that process, so nothing better will ever come:
    the provisional figures are the best estimate, and the basis says how they were
    settled (`...; status=final; settled=restart`). Run once, right after opening and
    before this process writes anything.
    """
    cursor = conn.execute(
        "UPDATE receipts SET status = 'final', "
        f"basis = replace(basis, 'status=provisional', 'status=final') || '; {SETTLED_AT_RESTART}' "
        "WHERE status = 'provisional'"
    )
    return cursor.rowcount


def purge_expired(conn: sqlite3.Connection, retention_days: float, now_unix: float | None = None) -> tuple[int, bool]:
    """Delete one chunk of receipts older than the retention. (deleted, more_left)."""
    cutoff = (now_unix if now_unix is not None else time.time()) - retention_days * SECONDS_PER_DAY
    deleted = conn.execute(
        "DELETE FROM receipts WHERE rowid IN (SELECT rowid FROM receipts WHERE started_unix < ? LIMIT ?)",
        (cutoff, PURGE_CHUNK_ROWS),
    ).rowcount
    if deleted < PURGE_CHUNK_ROWS:
        # Budget periods outlive receipts by a month at most: a month budget needs its month.
        day = time.strftime("day:%Y-%m-%d", time.gmtime(cutoff))
        month = time.strftime("month:%Y-%m", time.gmtime(cutoff - 31 * SECONDS_PER_DAY))
        conn.execute(
            "DELETE FROM tenant_usage WHERE (period LIKE 'day:%' AND period < ?) OR (period LIKE 'month:%' AND period < ?)",
            (day, month),
        )
    return deleted, deleted >= PURGE_CHUNK_ROWS


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the database file in use (free pages excluded)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


def trim_to_size(conn: sqlite3.Connection, max_bytes: int) -> int:
    """Delete the oldest receipts until the file uses under 90% of max_bytes; then give
    the freed pages back to the filesystem. Returns the rows deleted."""
    used = used_bytes(conn)
    if used <= max_bytes:
        return 0
    total = 0
    target = 0.9 * max_bytes
    while used > target:
        rows = conn.execute("SELECT count(*) FROM receipts").fetchone()[0]
        if rows == 0:
            break
        excess = int(rows * (used - target) / used) + 1
        total += conn.execute(
            "DELETE FROM receipts WHERE rowid IN (SELECT rowid FROM receipts ORDER BY started_unix LIMIT ?)",
            (min(excess, PURGE_CHUNK_ROWS),),
        ).rowcount
        used = used_bytes(conn)
    conn.execute("PRAGMA incremental_vacuum").fetchall()  # it frees pages as it is stepped
    return total
