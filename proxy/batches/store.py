"""The Batch API's durable state: files, batches, their lines and one result per line.

Its own SQLite file and connection (never the receipts database's), every call run in a
worker thread so the event loop never waits on the disk. A result row is keyed by
(batch, line): a line that was in flight at a crash runs again, and only its first
result is kept, so no line is ever written twice into an output file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, TypeVar

import orjson

from proxy.batches.store_base import Line, Result, StoredFile, new_id

__all__ = ["BatchStore", "Line", "Result", "StoredFile", "new_id"]

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, tenant TEXT NOT NULL, created_at INTEGER NOT NULL,
    ended_at REAL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, id);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (batch_id, line_no)
);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, ok INTEGER NOT NULL, record BLOB NOT NULL,
    ran_at REAL NOT NULL, grams REAL NOT NULL, counterfactual_grams REAL NOT NULL, receipt_id TEXT,
    PRIMARY KEY (batch_id, line_no)
);
"""


class BatchStore:
    shared = False
    """One process owns the file: no other replica runs its batches."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used by one worker thread at a time

    async def start(self) -> None:
        def open_db() -> sqlite3.Connection:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            return db

        self._db = await asyncio.to_thread(open_db)

    async def close(self) -> None:
        def close_db() -> None:
            # Under the lock: a call still running in a worker thread (one whose task was
            # cancelled) finishes first; closing under it would crash sqlite.
            with self._lock:
                db, self._db = self._db, None
                if db is not None:
                    db.close()

        await asyncio.to_thread(close_db)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                if self._db is None:
                    raise RuntimeError("the batch store is closed (or was never started)")
                return work(self._db)

        return await asyncio.to_thread(locked)

    # -- files ---------------------------------------------------------------------------

    async def add_file(self, file: StoredFile, content: bytes) -> None:
        """A file of the same id and owner is replaced (a batch's output file, written
        again when the process that finalized it died before ending the batch)."""
        written = await self._run(
            lambda db: db.execute(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET purpose = excluded.purpose,"
                " filename = excluded.filename, bytes = excluded.bytes, created_at = excluded.created_at,"
                " content = excluded.content WHERE files.owner = excluded.owner",
                (file.id, file.owner, file.purpose, file.filename, file.bytes, file.created_at, content),
            ).rowcount
        )
        if written == 0:
            raise ValueError(f"file id {file.id!r} belongs to another owner")

    async def file(self, file_id: str, owner: str) -> StoredFile | None:
        def get(db: sqlite3.Connection) -> StoredFile | None:
            row = db.execute(
                "SELECT id, owner, purpose, filename, bytes, created_at FROM files WHERE id = ? AND owner = ?", (file_id, owner)
            ).fetchone()
            return StoredFile(*row) if row else None

        return await self._run(get)

    async def list_files(self, owner: str, purpose: str | None, after: str | None, limit: int) -> list[StoredFile]:
        """Newest first; `after` is the last id of the previous page."""

        def get(db: sqlite3.Connection) -> list[StoredFile]:
            query = "SELECT id, owner, purpose, filename, bytes, created_at FROM files WHERE owner = ?"
            args: list[object] = [owner]
            if purpose:
                query += " AND purpose = ?"
                args.append(purpose)
            if after:
                anchor = db.execute("SELECT created_at FROM files WHERE id = ? AND owner = ?", (after, owner)).fetchone()
                if anchor is None:
                    return []
                query += " AND (created_at < ? OR (created_at = ? AND id < ?))"
                args += [anchor[0], anchor[0], after]
            rows = db.execute(query + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit)).fetchall()
            return [StoredFile(*row) for row in rows]

        return await self._run(get)

    async def file_content(self, file_id: str, owner: str) -> bytes | None:
        def get(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT content FROM files WHERE id = ? AND owner = ?", (file_id, owner)).fetchone()
            return bytes(row[0]) if row else None

        return await self._run(get)

    async def delete_file(self, file_id: str, owner: str) -> bool:
        return await self._run(lambda db: db.execute("DELETE FROM files WHERE id = ? AND owner = ?", (file_id, owner)).rowcount > 0)

    # -- batches -------------------------------------------------------------------------

    async def add_batch(self, batch: dict[str, Any], owner: str, tenant: str, lines: list[Line]) -> None:
        def add(db: sqlite3.Connection) -> None:
            with db:  # the batch and all its lines, or nothing
                db.execute("BEGIN")
                db.execute(
                    "INSERT INTO batches VALUES (?, ?, ?, ?, NULL, ?)",
                    (batch["id"], owner, tenant, batch["created_at"], orjson.dumps(batch).decode()),
                )
                db.executemany(
                    "INSERT INTO lines VALUES (?, ?, ?, ?)", [(batch["id"], l.line_no, l.custom_id, l.body) for l in lines]
                )

        await self._run(add)

    async def batch(self, batch_id: str, owner: str | None = None) -> dict[str, Any] | None:
        def get(db: sqlite3.Connection) -> dict[str, Any] | None:
            if owner is None:
                row = db.execute("SELECT data FROM batches WHERE id = ?", (batch_id,)).fetchone()
            else:
                row = db.execute("SELECT data FROM batches WHERE id = ? AND owner = ?", (batch_id, owner)).fetchone()
            return orjson.loads(row[0]) if row else None

        return await self._run(get)

    async def owner_of(self, batch_id: str) -> tuple[str, str] | None:
        def get(db: sqlite3.Connection) -> tuple[str, str] | None:
            row = db.execute("SELECT owner, tenant FROM batches WHERE id = ?", (batch_id,)).fetchone()
            return (row[0], row[1]) if row else None

        return await self._run(get)

    async def save_batch(self, batch: dict[str, Any], ended_at: float | None = None) -> None:
        await self._run(
            lambda db: db.execute(
                # An ended batch is only written by a save that ends it (as pg_store's _SAVE).
                "UPDATE batches SET data = ?, ended_at = COALESCE(?, ended_at) WHERE id = ? AND (ended_at IS NULL OR ? IS NOT NULL)",
                (orjson.dumps(batch).decode(), ended_at, batch["id"], ended_at),
            )
        )

    async def add_lines(self, batch: dict[str, Any], lines: list[Line]) -> None:
        """A validated batch's lines and its new record (in_progress), together or not at all."""

        def add(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN")
                db.execute("UPDATE batches SET data = ? WHERE id = ?", (orjson.dumps(batch).decode(), batch["id"]))
                db.executemany(
                    "INSERT INTO lines VALUES (?, ?, ?, ?)", [(batch["id"], l.line_no, l.custom_id, l.body) for l in lines]
                )

        await self._run(add)

    async def list_batches(self, owner: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, as OpenAI lists them; `after` is the last id of the previous page."""

        def get(db: sqlite3.Connection) -> list[dict[str, Any]]:
            if after:
                anchor = db.execute("SELECT created_at FROM batches WHERE id = ? AND owner = ?", (after, owner)).fetchone()
                if anchor is None:
                    return []
                rows = db.execute(
                    "SELECT data FROM batches WHERE owner = ? AND (created_at < ? OR (created_at = ? AND id < ?))"
                    " ORDER BY created_at DESC, id DESC LIMIT ?",
                    (owner, anchor[0], anchor[0], after, limit),
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT data FROM batches WHERE owner = ? ORDER BY created_at DESC, id DESC LIMIT ?", (owner, limit)
                ).fetchall()
            return [orjson.loads(r[0]) for r in rows]

        return await self._run(get)

    async def all_batches(self) -> list[dict[str, Any]]:
        return await self._run(lambda db: [orjson.loads(r[0]) for r in db.execute("SELECT data FROM batches ORDER BY created_at, id")])

    async def unfinished(self) -> list[str]:
        return await self._run(lambda db: [r[0] for r in db.execute("SELECT id FROM batches WHERE ended_at IS NULL ORDER BY created_at")])

    @asynccontextmanager
    async def lease(self, batch_id: str, on_cancel: Callable[[], None]) -> AsyncIterator[bool]:
        yield True  # this process is the only runner; a cancel reaches it directly

    # -- lines and results ---------------------------------------------------------------

    async def pending_lines(self, batch_id: str) -> list[Line]:
        """Lines without a result, in order (a line in flight at a crash is among them)."""

        def get(db: sqlite3.Connection) -> list[Line]:
            rows = db.execute(
                "SELECT l.line_no, l.custom_id, l.body FROM lines l LEFT JOIN results r"
                " ON r.batch_id = l.batch_id AND r.line_no = l.line_no WHERE l.batch_id = ? AND r.line_no IS NULL"
                " ORDER BY l.line_no",
                (batch_id,),
            ).fetchall()
            return [Line(r[0], r[1], bytes(r[2])) for r in rows]

        return await self._run(get)

    async def add_result(self, batch_id: str, result: Result) -> bool:
        """False when the line already has one (the first is kept)."""
        return await self._run(
            lambda db: db.execute(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (batch_id, result.line_no, int(result.ok), result.record, result.ran_at, result.grams, result.counterfactual_grams, result.receipt_id),
            ).rowcount
            > 0
        )

    async def add_results(self, batch_id: str, results: list[Result]) -> None:
        def add(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN")
                db.executemany(
                    "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(batch_id, r.line_no, int(r.ok), r.record, r.ran_at, r.grams, r.counterfactual_grams, r.receipt_id) for r in results],
                )

        await self._run(add)

    async def count_results(self, batch_id: str) -> tuple[int, int]:
        """(succeeded, failed) lines so far."""

        def count(db: sqlite3.Connection) -> tuple[int, int]:
            rows = dict(db.execute("SELECT ok, COUNT(*) FROM results WHERE batch_id = ? GROUP BY ok", (batch_id,)).fetchall())
            return rows.get(1, 0), rows.get(0, 0)

        return await self._run(count)

    async def results(self, batch_id: str) -> list[Result]:
        def get(db: sqlite3.Connection) -> list[Result]:
            rows = db.execute(
                "SELECT line_no, ok, record, ran_at, grams, counterfactual_grams, receipt_id FROM results"
                " WHERE batch_id = ? ORDER BY line_no",
                (batch_id,),
            ).fetchall()
            return [Result(r[0], bool(r[1]), bytes(r[2]), r[3], r[4], r[5], r[6]) for r in rows]

        return await self._run(get)

    async def update_grams(self, batch_id: str, line_no: int, grams: float, counterfactual_grams: float) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE results SET grams = ?, counterfactual_grams = ? WHERE batch_id = ? AND line_no = ?",
                (grams, counterfactual_grams, batch_id, line_no),
            )
        )

    async def forget_lines(self, batch_id: str) -> None:
        """Once the output files are written, the input lines and results are not needed."""

        def forget(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN")
                db.execute("DELETE FROM lines WHERE batch_id = ?", (batch_id,))
                db.execute("DELETE FROM results WHERE batch_id = ?", (batch_id,))

        await self._run(forget)

    async def expire(self, before_unix: float) -> int:
        """Retention: finished batches (and every file they made or read) older than this."""

        def drop(db: sqlite3.Connection) -> int:
            with db:
                db.execute("BEGIN")
                old = [orjson.loads(r[0]) for r in db.execute("SELECT data FROM batches WHERE ended_at < ?", (before_unix,))]
                for batch in old:
                    for key in ("output_file_id", "error_file_id"):
                        if batch.get(key):
                            db.execute("DELETE FROM files WHERE id = ?", (batch[key],))
                    db.execute("DELETE FROM lines WHERE batch_id = ?", (batch["id"],))
                    db.execute("DELETE FROM results WHERE batch_id = ?", (batch["id"],))
                    db.execute("DELETE FROM batches WHERE id = ?", (batch["id"],))
                db.execute("DELETE FROM files WHERE purpose = 'batch' AND created_at < ?", (before_unix,))
                return len(old)

        return await self._run(drop)
