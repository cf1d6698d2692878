"""Receipts with `[receipts] backend = "postgres"`: the local SQLite store (the durable
outbox, and what requests wait on) plus a shipper to the fleet's PostgreSQL.

Lookups read both: this proxy's own receipts not shipped yet are only local, and a
receipt made through another replica is only in PostgreSQL (a load balancer sends the
GET anywhere). When PostgreSQL is down, lookups answer from the local file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Sequence

from proxy.receipts.backend import resolve_dsn
from proxy.receipts.model import Receipt, ReceiptQuery
from proxy.receipts.postgres import Postgres, PostgresUnavailable
from proxy.receipts.shipper import Shipper
from proxy.receipts.sqlite import SqliteReceiptStore

if TYPE_CHECKING:
    from proxy.config import ReceiptsConfig

log = logging.getLogger("carbon_proxy.receipts")

LOOKUP_SECONDS = 1.0
"""A receipt lookup waits at most this for the fleet; then it answers from the local file."""


def replica_name() -> str:
    """This process among the fleet's: host and pid (a restart is a new replica)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def build_fleet_store(config: "ReceiptsConfig") -> "FleetReceiptStore":
    dsn = resolve_dsn(config.dsn, config.dsn_env)
    local = SqliteReceiptStore(config.path, retention_days=config.retention_days, max_mb=config.max_mb, outbox=True)
    postgres = Postgres(dsn)
    shipper = Shipper(config.path, postgres, replica_name(), retention_days=config.retention_days)
    return FleetReceiptStore(local, postgres, shipper)


class FleetReceiptStore:
    def __init__(self, local: SqliteReceiptStore, postgres: Postgres, shipper: Shipper) -> None:
        self.local = local
        self.postgres = postgres
        self.shipper = shipper

    # The local store's health and counters (readiness and metrics read them).
    @property
    def dropped_total(self) -> int:
        return self.local.dropped_total

    @property
    def writer_up(self) -> bool:
        return self.local.writer_up

    @property
    def written_total(self) -> int:
        return self.local.written_total

    @property
    def poison_total(self) -> int:
        return self.local.poison_total

    @property
    def write_errors_total(self) -> int:
        return self.local.write_errors_total

    @property
    def healthy(self) -> bool:
        return self.local.healthy

    async def start(self) -> None:
        await self.local.start()
        await self.shipper.start()

    def put(self, receipt: Receipt) -> None:
        self.local.put(receipt)

    async def written(self, receipt_id: str, timeout_seconds: float) -> bool:
        return await self.local.written(receipt_id, timeout_seconds)

    async def get(self, receipt_id: str) -> Receipt | None:
        local = await self.local.get(receipt_id)
        if local is not None:
            return local
        try:
            return await asyncio.wait_for(self.postgres.get(receipt_id), LOOKUP_SECONDS)
        except (PostgresUnavailable, asyncio.TimeoutError):
            return None

    async def find(self, credential_hash: str | None, request_id: str, limit: int) -> list[Receipt]:
        local = await self.local.find(credential_hash, request_id, limit)
        try:
            fleet = await asyncio.wait_for(self.postgres.find(credential_hash, request_id, limit), LOOKUP_SECONDS)
        except (PostgresUnavailable, asyncio.TimeoutError):
            fleet = []
        merged = _merge(local, fleet)
        merged.sort(key=lambda r: (r.started_unix, r.receipt_id), reverse=True)
        return merged[:limit]

    async def list(self, query: ReceiptQuery) -> list[Receipt]:
        local = await self.local.list(query)
        try:
            fleet = await asyncio.wait_for(self.postgres.list(query), LOOKUP_SECONDS)
        except (PostgresUnavailable, asyncio.TimeoutError):
            fleet = []
        merged = _merge(local, fleet)
        merged.sort(key=lambda r: r.receipt_id)
        return merged[: query.limit]

    async def tenant_usage_grams(
        self, periods: Sequence[str], tenants: Sequence[str] | None = None
    ) -> dict[tuple[str, str], float]:
        return await self.local.tenant_usage_grams(periods, tenants)

    async def close(self) -> None:
        await self.local.close()  # everything queued is in the file, and in the outbox
        await self.shipper.close()
        await self.postgres.close()


def _merge(local: list[Receipt], fleet: list[Receipt]) -> list[Receipt]:
    """One receipt per id: the final one where the two copies differ."""
    by_id = {r.receipt_id: r for r in fleet}
    for receipt in local:
        known = by_id.get(receipt.receipt_id)
        if known is None or known.status != "final":
            by_id[receipt.receipt_id] = receipt
    return list(by_id.values())
