"""The Batch API's state in the fleet's PostgreSQL (`[receipts] backend = "postgres"`).

Same contract as the SQLite store (proxy.batches.store_base), shared by every replica:
any replica answers GET, list and cancel for any batch, and files and batches stay
scoped to the credential that made them. Running is not shared: a replica runs a batch's
lines only while it holds the batch's lease (`lease_owner`, `lease_until` on the batch
row, taken by one conditional UPDATE, renewed every third of LEASE_SECONDS). A replica
that dies stops renewing; once the lease has expired another takes the batch over and
resumes from its results (lines with a result never run again). A result row is keyed
by (batch, line) and the first one is kept, so even a line run twice (by a replica that
lost its lease mid-line) appears once in the output file. Times of leases are the
database's clock, so replicas' clocks need not agree.

File contents are `bytea` (at most `[batches] max_file_bytes`, 100 MiB by default; with
this store the setting must stay under MAX_FILE_BYTES, PostgreSQL's limit of one value).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import orjson

from proxy.batches.store_base import Line, Result, StoredFile
from proxy.receipts.fleet import replica_name

log = logging.getLogger("carbon_proxy.batches")

LEASE_SECONDS = 30.0
MAX_FILE_BYTES = 1024 * 1024 * 1024 - 1
"""PostgreSQL stores one value (a file's bytea) of less than 1 GiB."""
DDL_LOCK = 0x62617463  # "batc": advisory lock key: schema creation takes it alone, retention sweeps shared
CALL_SECONDS = 10.0
"""One call's bound: an unreachable or hung database answers the Batch API's clients with
503 in this time (the endpoint's error), not after minutes."""
BULK_SECONDS = 120.0
"""A call that moves a file or a batch's lines (a 100 MiB file goes through one)."""
CONNECT_SECONDS = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS carbon_batch_files (
    id text PRIMARY KEY, owner text NOT NULL, purpose text NOT NULL, filename text NOT NULL,
    bytes bigint NOT NULL, created_at bigint NOT NULL, content bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS carbon_batch_files_owner ON carbon_batch_files (owner, created_at, id);
CREATE TABLE IF NOT EXISTS carbon_batches (
    id text PRIMARY KEY, owner text NOT NULL, tenant text NOT NULL, created_at bigint NOT NULL,
    ended_at double precision, data jsonb NOT NULL, lease_owner text, lease_until timestamptz
);
CREATE INDEX IF NOT EXISTS carbon_batches_owner ON carbon_batches (owner, created_at, id);
CREATE TABLE IF NOT EXISTS carbon_batch_lines (
    batch_id text NOT NULL, line_no integer NOT NULL, custom_id text NOT NULL, body bytea NOT NULL,
    PRIMARY KEY (batch_id, line_no)
);
CREATE TABLE IF NOT EXISTS carbon_batch_results (
    batch_id text NOT NULL, line_no integer NOT NULL, ok boolean NOT NULL, record bytea NOT NULL,
    ran_at double precision NOT NULL, grams double precision NOT NULL,
    counterfactual_grams double precision NOT NULL, receipt_id text, replica text,
    PRIMARY KEY (batch_id, line_no)
);
"""
_FILE_COLUMNS = "id, owner, purpose, filename, bytes, created_at"
_RESULT_COLUMNS = "batch_id, line_no, ok, record, ran_at, grams, counterfactual_grams, receipt_id, replica"
# Each replica serialises its writes to a batch only among its own tasks, so a write
# may carry a record read before another replica's: a cancel written by one replica
# survives the runner's own writes on another (the running statuses never overwrite
# "cancelling"), and an ended batch is never reopened by a write that does not end it
# (a cancel read just before the runner ended the batch would otherwise put it back to
# "cancelling" with its output file gone from the record, its results already forgotten).
_SAVE = """
UPDATE carbon_batches SET ended_at = COALESCE($3, ended_at), data = CASE
    WHEN data->>'status' = 'cancelling' AND $2::jsonb->>'status' IN ('validating', 'in_progress')
    THEN $2::jsonb || jsonb_build_object('status', 'cancelling', 'cancelling_at', data->'cancelling_at')
    ELSE $2::jsonb END
WHERE id = $1 AND (ended_at IS NULL OR $3::float8 IS NOT NULL)
"""
_CLAIM = """
UPDATE carbon_batches SET lease_owner = $2, lease_until = now() + make_interval(secs => $3)
WHERE id = $1 AND ended_at IS NULL AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < now())
RETURNING id
"""
_RENEW = """
UPDATE carbon_batches SET lease_until = now() + make_interval(secs => $3)
WHERE id = $1 AND lease_owner = $2 RETURNING data->>'status'
"""


class PgBatchStore:
    shared = True

    def __init__(
        self, dsn: str, *, replica: str | None = None, lease_seconds: float = LEASE_SECONDS, call_seconds: float | None = None
    ) -> None:
        self._dsn = dsn
        self._call_seconds = CALL_SECONDS if call_seconds is None else call_seconds
        # host:pid plus a nonce: two stores in one process (tests) are two replicas
        self.replica = replica or f"{replica_name()}:{secrets.token_hex(3)}"
        self.lease_seconds = lease_seconds
        self._pool: Any = None

    async def start(self) -> None:
        import asyncpg

        extra: dict[str, Any] = {}
        if "target_session_attrs" not in self._dsn:
            extra["target_session_attrs"] = "read-write"  # as the receipts: never a standby of a multi-host DSN
        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=1, max_size=4, timeout=min(CONNECT_SECONDS, self._call_seconds), command_timeout=self._call_seconds, **extra
        )
        async with self._pool.acquire(timeout=self._call_seconds) as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", DDL_LOCK)
                # Only when missing: CREATE INDEX takes a table lock even when the index
                # exists, which would deadlock with another replica's retention sweep.
                if await conn.fetchval("SELECT to_regclass('carbon_batch_results')") is None:
                    await conn.execute(SCHEMA)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("the batch store is closed (or was never started)")
        return self._pool

    # -- files ---------------------------------------------------------------------------

    async def add_file(self, file: StoredFile, content: bytes) -> None:
        """A file of the same id and owner is replaced (a batch's output file, written
        again by the replica that finalizes it after another died finalizing it)."""
        status = await self.pool.execute(
            f"INSERT INTO carbon_batch_files ({_FILE_COLUMNS}, content) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (id) DO UPDATE SET purpose = excluded.purpose, filename = excluded.filename,"
            " bytes = excluded.bytes, created_at = excluded.created_at, content = excluded.content"
            " WHERE carbon_batch_files.owner = excluded.owner",
            file.id, file.owner, file.purpose, file.filename, file.bytes, file.created_at, content, timeout=BULK_SECONDS,
        )  # fmt: skip
        if status.endswith(" 0"):
            raise ValueError(f"file id {file.id!r} belongs to another owner")

    async def file(self, file_id: str, owner: str) -> StoredFile | None:
        row = await self.pool.fetchrow(f"SELECT {_FILE_COLUMNS} FROM carbon_batch_files WHERE id = $1 AND owner = $2", file_id, owner)
        return StoredFile(*row) if row else None

    async def list_files(self, owner: str, purpose: str | None, after: str | None, limit: int) -> list[StoredFile]:
        query = f"SELECT {_FILE_COLUMNS} FROM carbon_batch_files WHERE owner = $1 AND ($2::text IS NULL OR purpose = $2)"
        args: list[object] = [owner, purpose]
        if after:
            anchor = await self.pool.fetchval("SELECT created_at FROM carbon_batch_files WHERE id = $1 AND owner = $2", after, owner)
            if anchor is None:
                return []
            query += " AND (created_at, id) < ($3, $4)"
            args += [anchor, after]
        rows = await self.pool.fetch(query + f" ORDER BY created_at DESC, id DESC LIMIT ${len(args) + 1}", *args, limit)
        return [StoredFile(*row) for row in rows]

    async def file_content(self, file_id: str, owner: str) -> bytes | None:
        content = await self.pool.fetchval(
            "SELECT content FROM carbon_batch_files WHERE id = $1 AND owner = $2", file_id, owner, timeout=BULK_SECONDS
        )
        return bytes(content) if content is not None else None

    async def delete_file(self, file_id: str, owner: str) -> bool:
        status = await self.pool.execute("DELETE FROM carbon_batch_files WHERE id = $1 AND owner = $2", file_id, owner)
        return status != "DELETE 0"

    # -- batches -------------------------------------------------------------------------

    async def add_batch(self, batch: dict[str, Any], owner: str, tenant: str, lines: list[Line]) -> None:
        async with self.pool.acquire(timeout=self._call_seconds) as conn:
            async with conn.transaction():  # the batch and all its lines, or nothing
                await conn.execute(
                    "INSERT INTO carbon_batches (id, owner, tenant, created_at, data) VALUES ($1, $2, $3, $4, $5::jsonb)",
                    batch["id"], owner, tenant, batch["created_at"], orjson.dumps(batch).decode(),
                )  # fmt: skip
                if lines:
                    await conn.copy_records_to_table(
                        "carbon_batch_lines", records=[(batch["id"], l.line_no, l.custom_id, l.body) for l in lines], timeout=BULK_SECONDS
                    )

    async def add_lines(self, batch: dict[str, Any], lines: list[Line]) -> None:
        """A validated batch's lines and its new record (in_progress), together or not at all."""
        async with self.pool.acquire(timeout=self._call_seconds) as conn:
            async with conn.transaction():
                await conn.execute(_SAVE, batch["id"], orjson.dumps(batch).decode(), None)  # a cancel meanwhile stands
                if lines:
                    await conn.copy_records_to_table(
                        "carbon_batch_lines", records=[(batch["id"], l.line_no, l.custom_id, l.body) for l in lines], timeout=BULK_SECONDS
                    )

    async def batch(self, batch_id: str, owner: str | None = None) -> dict[str, Any] | None:
        data = await self.pool.fetchval(
            "SELECT data::text FROM carbon_batches WHERE id = $1 AND ($2::text IS NULL OR owner = $2)", batch_id, owner
        )
        return orjson.loads(data) if data is not None else None

    async def owner_of(self, batch_id: str) -> tuple[str, str] | None:
        row = await self.pool.fetchrow("SELECT owner, tenant FROM carbon_batches WHERE id = $1", batch_id)
        return (row[0], row[1]) if row else None

    async def save_batch(self, batch: dict[str, Any], ended_at: float | None = None) -> None:
        await self.pool.execute(_SAVE, batch["id"], orjson.dumps(batch).decode(), ended_at)

    async def list_batches(self, owner: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, as OpenAI lists them; `after` is the last id of the previous page."""
        if after:
            anchor = await self.pool.fetchval("SELECT created_at FROM carbon_batches WHERE id = $1 AND owner = $2", after, owner)
            if anchor is None:
                return []
            rows = await self.pool.fetch(
                "SELECT data::text FROM carbon_batches WHERE owner = $1 AND (created_at, id) < ($2, $3)"
                " ORDER BY created_at DESC, id DESC LIMIT $4",
                owner, anchor, after, limit,
            )  # fmt: skip
        else:
            rows = await self.pool.fetch(
                "SELECT data::text FROM carbon_batches WHERE owner = $1 ORDER BY created_at DESC, id DESC LIMIT $2", owner, limit
            )
        return [orjson.loads(r[0]) for r in rows]

    async def all_batches(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch("SELECT data::text FROM carbon_batches ORDER BY created_at, id")
        return [orjson.loads(r[0]) for r in rows]

    async def unfinished(self) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT id FROM carbon_batches WHERE ended_at IS NULL"
            " AND (lease_owner IS NULL OR lease_owner = $1 OR lease_until < now()) ORDER BY created_at, id",
            self.replica,
        )
        return [r[0] for r in rows]

    # -- the lease -----------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, batch_id: str, on_cancel: Callable[[], None]) -> AsyncIterator[bool]:
        claimed_at = time.monotonic()  # before the claim is sent: the lease ends no earlier than this + lease_seconds
        if await self.pool.fetchval(_CLAIM, batch_id, self.replica, self.lease_seconds) is None:
            yield False  # another replica runs it (or it has ended)
            return
        runner = asyncio.current_task()
        assert runner is not None
        keeper = asyncio.create_task(self._keep(batch_id, on_cancel, runner, claimed_at), name=f"lease {batch_id}")
        try:
            yield True
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            try:  # a clean stop hands the batch over at once; a crash (or a quiet database) leaves it to expire
                release = self.pool.execute(
                    "UPDATE carbon_batches SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2",
                    batch_id, self.replica,
                )  # fmt: skip
                await asyncio.wait_for(release, self.lease_seconds / 3)
            except Exception as exc:
                log.warning("batch %s: lease not released (%s); it expires in %.0f s", batch_id, type(exc).__name__, self.lease_seconds)

    async def _keep(self, batch_id: str, on_cancel: Callable[[], None], runner: asyncio.Task[Any], held_since: float) -> None:
        """Renew the lease; stop the runner when it is lost (another replica may run the
        batch) or cannot be renewed in time (the database is unreachable or slow: no
        result could be stored either, so lines sent now would only run again). A renewal
        waits at most until a margin before the lease it holds would end, by this
        process's clock from before the claim or renewal was sent (the database sets the
        end from when it ran the statement, later): so this replica has stopped before
        another can take the batch, even when a renewal hangs. The batch resumes where
        the lease is next taken, here or on another replica, from its stored results."""
        margin = self.lease_seconds / 6
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            sent = time.monotonic()
            try:
                status = await asyncio.wait_for(
                    self.pool.fetchval(_RENEW, batch_id, self.replica, self.lease_seconds),
                    max(0.0, held_since + self.lease_seconds - margin - sent),
                )
            except Exception as exc:
                log.warning("batch %s: lease renewal failed (%s); stopping its lines", batch_id, type(exc).__name__)
                runner.cancel()
                return
            if status is None:
                log.warning("batch %s: lease not held; the replica that takes it next resumes it", batch_id)
                runner.cancel()
                return
            held_since = sent
            if status == "cancelling":
                on_cancel()  # cancelled through another replica

    # -- lines and results ---------------------------------------------------------------

    async def pending_lines(self, batch_id: str) -> list[Line]:
        rows = await self.pool.fetch(
            "SELECT l.line_no, l.custom_id, l.body FROM carbon_batch_lines l LEFT JOIN carbon_batch_results r"
            " ON r.batch_id = l.batch_id AND r.line_no = l.line_no WHERE l.batch_id = $1 AND r.line_no IS NULL"
            " ORDER BY l.line_no",
            batch_id, timeout=BULK_SECONDS,
        )  # fmt: skip
        return [Line(r[0], r[1], bytes(r[2])) for r in rows]

    def _row(self, batch_id: str, r: Result) -> tuple[object, ...]:
        return (batch_id, r.line_no, r.ok, r.record, r.ran_at, r.grams, r.counterfactual_grams, r.receipt_id, self.replica)

    async def add_result(self, batch_id: str, result: Result) -> bool:
        """False when the line already has one (the first is kept)."""
        status = await self.pool.execute(
            f"INSERT INTO carbon_batch_results ({_RESULT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            " ON CONFLICT DO NOTHING",
            *self._row(batch_id, result),
        )
        return status.endswith(" 1")

    async def add_results(self, batch_id: str, results: list[Result]) -> None:
        await self.pool.executemany(
            f"INSERT INTO carbon_batch_results ({_RESULT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            " ON CONFLICT DO NOTHING",
            [self._row(batch_id, r) for r in results], timeout=BULK_SECONDS,
        )  # fmt: skip

    async def count_results(self, batch_id: str) -> tuple[int, int]:
        rows = await self.pool.fetch("SELECT ok, COUNT(*) FROM carbon_batch_results WHERE batch_id = $1 GROUP BY ok", batch_id)
        counts = {bool(r[0]): int(r[1]) for r in rows}
        return counts.get(True, 0), counts.get(False, 0)

    async def results(self, batch_id: str) -> list[Result]:
        rows = await self.pool.fetch(
            "SELECT line_no, ok, record, ran_at, grams, counterfactual_grams, receipt_id FROM carbon_batch_results"
            " WHERE batch_id = $1 ORDER BY line_no",
            batch_id, timeout=BULK_SECONDS,
        )  # fmt: skip
        return [Result(r[0], bool(r[1]), bytes(r[2]), r[3], r[4], r[5], r[6]) for r in rows]

    async def update_grams(self, batch_id: str, line_no: int, grams: float, counterfactual_grams: float) -> None:
        await self.pool.execute(
            "UPDATE carbon_batch_results SET grams = $3, counterfactual_grams = $4 WHERE batch_id = $1 AND line_no = $2",
            batch_id, line_no, grams, counterfactual_grams,
        )  # fmt: skip

    async def forget_lines(self, batch_id: str) -> None:
        async with self.pool.acquire(timeout=self._call_seconds) as conn:
            async with conn.transaction():
                await conn.execute("DELETE FROM carbon_batch_lines WHERE batch_id = $1", batch_id)
                await conn.execute("DELETE FROM carbon_batch_results WHERE batch_id = $1", batch_id)

    async def expire(self, before_unix: float) -> int:
        """Retention: finished batches (and every file they made or read) older than this."""
        async with self.pool.acquire(timeout=self._call_seconds) as conn:
            async with conn.transaction():
                # Shared with other sweeps, exclusive with schema creation (see start).
                await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", DDL_LOCK)
                old = await conn.fetch(
                    "DELETE FROM carbon_batches WHERE ended_at < $1 RETURNING id, data->>'output_file_id', data->>'error_file_id'",
                    before_unix,
                )
                ids = [r[0] for r in old]
                files = [f for r in old for f in (r[1], r[2]) if f]
                await conn.execute("DELETE FROM carbon_batch_files WHERE id = ANY($1::text[])", files)
                await conn.execute("DELETE FROM carbon_batch_lines WHERE batch_id = ANY($1::text[])", ids)
                await conn.execute("DELETE FROM carbon_batch_results WHERE batch_id = ANY($1::text[])", ids)
                await conn.execute("DELETE FROM carbon_batch_files WHERE purpose = 'batch' AND created_at < $1::float8", before_unix)
                return len(ids)
