"""The fleet's PostgreSQL, through asyncpg: one small pool, recycled on failover.

Every call is bounded (`timeout_seconds`) and never retried in place: a caller on the
request path gets an error at once and goes on without the database; the shipper and
the budget sync retry on their own schedule. A connection that answers SQLSTATE 25006
(read-only transaction: the primary it reached was demoted by a failover) or that died
is thrown away with every other pooled connection, so the next call connects afresh and
`target_session_attrs` (default read-write) picks the new primary from a multi-host DSN.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from proxy.receipts import pg_schema
from proxy.receipts.model import FIELD_NAMES, Receipt, ReceiptQuery

log = logging.getLogger("carbon_proxy.postgres")

T = TypeVar("T")
READ_ONLY_SQLSTATE = "25006"
RETENTION_CHECK_SECONDS = 3600.0


def _connection_lost(exc: BaseException) -> bool:
    import asyncpg

    lost = (
        OSError, asyncio.TimeoutError, asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.exceptions.InterfaceError,
        asyncpg.exceptions.TargetServerAttributeNotMatched,
    )  # fmt: skip
    return isinstance(exc, lost) or getattr(exc, "sqlstate", "") in (READ_ONLY_SQLSTATE, "57P01", "57P02", "57P03", "08000", "08003", "08006")


class PostgresUnavailable(Exception):
    """The fleet database cannot be used right now (the cause is chained)."""


class Postgres:
    def __init__(self, dsn: str, *, timeout_seconds: float = 5.0, max_connections: int = 4) -> None:
        self._dsn = dsn
        self._timeout = timeout_seconds
        self._max = max_connections
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()
        self._schema_ready = False
        self._partitions: set[int] = set()
        self._next_retention = 0.0
        self.healthy = False
        self.recycled_total = 0
        self.failures_total = 0
        self.last_error: str | None = None
        self._failing_logged = False

    async def run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """`work(connection)` on a pooled connection, bounded; PostgresUnavailable on any
        database or connection failure (the pool is recycled when it must be)."""
        try:
            pool = await self._ensure_pool()
            async with pool.acquire(timeout=self._timeout) as conn:
                if not self._schema_ready:
                    await self._create_schema(conn)
                result = await asyncio.wait_for(work(conn), self._timeout)
        except Exception as exc:
            await self._failed(exc)
            raise PostgresUnavailable(str(exc) or type(exc).__name__) from exc
        self._recovered()
        return result

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except Exception:
                pool.terminate()

    # -- receipts -------------------------------------------------------------------------

    async def upsert(self, receipts: Sequence[Sequence[object]], replica: str) -> None:
        """Rows in Receipt field order; idempotent (see pg_schema.UPSERT)."""
        days = {pg_schema.day_of(float(row[FIELD_NAMES.index("started_unix")])) for row in receipts}  # type: ignore[arg-type]
        columns = [list(column) for column in zip(*receipts)]

        async def write(conn: Any) -> None:
            missing = days - self._partitions
            if missing:
                await self._create_partitions(conn, missing)
            await conn.execute(pg_schema.UPSERT, *columns, replica)

        await self.run(write)

    async def get(self, receipt_id: str) -> Receipt | None:
        row = await self.run(lambda conn: conn.fetchrow(pg_schema.SELECT_ONE, receipt_id))
        return Receipt(*row) if row is not None else None

    async def find(self, credential_hash: str | None, request_id: str, limit: int) -> list[Receipt]:
        rows = await self.run(lambda conn: conn.fetch(pg_schema.FIND, credential_hash, request_id, limit))
        return [Receipt(*row) for row in rows]

    async def list(self, query: ReceiptQuery) -> list[Receipt]:
        rows = await self.run(
            lambda conn: conn.fetch(
                pg_schema.LIST, query.credential_hash, query.after or "", query.since_unix, query.until_unix, query.limit
            )
        )
        return [Receipt(*row) for row in rows]

    async def drop_expired(self, retention_days: float, now_unix: float | None = None) -> list[str]:
        """Drop the partitions wholly older than the retention (at most hourly)."""
        now = time.time() if now_unix is None else now_unix
        if time.monotonic() < self._next_retention and now_unix is None:
            return []
        cutoff_day = pg_schema.day_of(now - retention_days * pg_schema.SECONDS_PER_DAY)

        async def drop(conn: Any) -> list[str]:
            dropped: list[str] = []
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", pg_schema.DDL_LOCK)
                for record in await conn.fetch(pg_schema.PARTITIONS):
                    name = record[0]
                    day = pg_schema.partition_day(name)
                    if day is not None and day < cutoff_day:
                        await conn.execute(f'DROP TABLE IF EXISTS "{name}"')
                        self._partitions.discard(day)
                        dropped.append(name)
            return dropped

        dropped = await self.run(drop)
        self._next_retention = time.monotonic() + RETENTION_CHECK_SECONDS
        if dropped:
            log.info("receipts: dropped %d partition(s) past the retention: %s", len(dropped), ", ".join(dropped))
        return dropped

    # -- internals ------------------------------------------------------------------------

    async def _ensure_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                import asyncpg

                extra: dict[str, Any] = {}
                if "target_session_attrs" not in self._dsn:
                    extra["target_session_attrs"] = "read-write"  # never write to a standby
                self._pool = await asyncio.wait_for(
                    asyncpg.create_pool(
                        self._dsn, min_size=0, max_size=self._max, timeout=self._timeout, command_timeout=self._timeout,
                        max_inactive_connection_lifetime=60.0, **extra,
                    ),
                    self._timeout,
                )  # fmt: skip
        return self._pool

    async def _create_schema(self, conn: Any) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", pg_schema.DDL_LOCK)
            await conn.execute(pg_schema.CREATE)
            await conn.execute(pg_schema.MIGRATE)
        self._schema_ready = True

    async def _create_partitions(self, conn: Any, days: set[int]) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", pg_schema.DDL_LOCK)
            for day in sorted(days):
                await conn.execute(pg_schema.create_partition(day))
        self._partitions |= days

    async def _failed(self, exc: BaseException) -> None:
        self.healthy = False
        self.failures_total += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if not self._failing_logged:  # once per outage
            self._failing_logged = True
            log.error("postgres: %s; receipts stay in the local outbox and are shipped when it is back", self.last_error)
        if _connection_lost(exc):
            # A demoted primary (25006) still answers: drop every pooled connection, so the
            # next call reconnects and target_session_attrs finds the writable host.
            self.recycled_total += 1
            pool, self._pool = self._pool, None
            self._schema_ready = False
            if pool is not None:
                pool.terminate()

    def _recovered(self) -> None:
        if self._failing_logged:
            self._failing_logged = False
            log.warning("postgres: reachable again")
        self.healthy = True
