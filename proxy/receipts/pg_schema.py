"""The fleet's PostgreSQL schema (SQL only): receipts partitioned by day, budget tables.

- `carbon_receipts`: one row per receipt, the Receipt fields plus `started_at` (the
  partition key) and `replica`. Primary key (receipt_id, started_at): a receipt always
  has the same start, so shipping it twice conflicts and changes nothing (provisional ->
  final, never back). Partitions `carbon_receipts_pYYYYMMDD` are created before a batch
  needs them; retention drops whole partitions (no DELETE, no bloat, no vacuum debt).
- `carbon_budget_usage`: settled grams per tenant and period, shared by every replica.
- `carbon_budget_reservations`: grams each replica holds for requests in flight, per
  tenant and period; rows not refreshed for a few seconds (a dead replica) are ignored.
Every DDL step runs under one advisory lock, so replicas starting together do not race.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import fields

from proxy.receipts.model import FIELD_NAMES, Receipt

DDL_LOCK = 0x63617262  # "carb": pg_advisory_xact_lock key for schema and partition changes
SECONDS_PER_DAY = 86_400


def _pg_type(annotation: object) -> str:
    text = str(annotation)
    if text.startswith("int"):
        return "bigint"
    if text.startswith("float"):
        return "double precision"
    return "text"


PG_TYPES: dict[str, str] = {f.name: _pg_type(f.type) for f in fields(Receipt)}
_COLUMNS = ", ".join(FIELD_NAMES)

CREATE = f"""
CREATE TABLE IF NOT EXISTS carbon_receipts (
    {', '.join(f'{name} {PG_TYPES[name]}' for name in FIELD_NAMES)},
    started_at timestamptz NOT NULL,
    replica text,
    shipped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (receipt_id, started_at)
) PARTITION BY RANGE (started_at);
CREATE INDEX IF NOT EXISTS carbon_receipts_client_id ON carbon_receipts (credential_hash, request_id);
CREATE INDEX IF NOT EXISTS carbon_receipts_owner ON carbon_receipts (credential_hash, receipt_id);
CREATE INDEX IF NOT EXISTS carbon_receipts_id ON carbon_receipts (receipt_id);
CREATE TABLE IF NOT EXISTS carbon_budget_usage (
    tenant text NOT NULL, period text NOT NULL, used_grams double precision NOT NULL DEFAULT 0,
    reserved_grams double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, period)
);
CREATE TABLE IF NOT EXISTS carbon_budget_reservations (
    replica text NOT NULL, tenant text NOT NULL, period text NOT NULL,
    reserved_grams double precision NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replica, tenant, period)
);
"""

_UNNEST = ", ".join(f"${i + 1}::{PG_TYPES[name]}[]" for i, name in enumerate(FIELD_NAMES))
_UPDATES = ", ".join(f"{name} = excluded.{name}" for name in FIELD_NAMES if name != "receipt_id")
UPSERT = (
    f"INSERT INTO carbon_receipts ({_COLUMNS}, started_at, replica) "
    f"SELECT u.*, to_timestamp(u.started_unix), ${len(FIELD_NAMES) + 1} FROM unnest({_UNNEST}) AS u({_COLUMNS}) "
    f"ON CONFLICT (receipt_id, started_at) DO UPDATE SET {_UPDATES}, shipped_at = now() "
    # provisional -> final, never back: a re-shipped provisional row changes nothing.
    "WHERE carbon_receipts.status <> 'final' AND excluded.status = 'final'"
)
"""Parameters: one array per Receipt field (column order), then the replica name."""

SELECT_ONE = f"SELECT {_COLUMNS} FROM carbon_receipts WHERE receipt_id = $1 LIMIT 1"
FIND = (
    f"SELECT {_COLUMNS} FROM carbon_receipts WHERE credential_hash IS NOT DISTINCT FROM $1 AND request_id = $2 "
    "ORDER BY started_unix DESC, receipt_id DESC LIMIT $3"
)
LIST = (
    f"SELECT {_COLUMNS} FROM carbon_receipts WHERE credential_hash IS NOT DISTINCT FROM $1 AND receipt_id > $2 "
    "AND ($3::double precision IS NULL OR started_unix >= $3) AND ($4::double precision IS NULL OR started_unix < $4) "
    "ORDER BY receipt_id LIMIT $5"
)
PARTITIONS = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'carbon_receipts'"
)


ROUTING_COLUMNS = ("route", "avoided_grams")
"""Added by carbon-aware routing (proxy.routing) after the first fleet schema."""
MIGRATE = "".join(
    f"ALTER TABLE carbon_receipts ADD COLUMN IF NOT EXISTS {name} {PG_TYPES[name]};\n" for name in ROUTING_COLUMNS
)
"""A table made by an earlier version gets the newer columns (a partitioned table passes
ADD COLUMN on to its partitions); on a new table it changes nothing."""


def day_of(unix_seconds: float) -> int:
    """Days since the epoch (UTC): the partition a receipt belongs to."""
    return int(unix_seconds // SECONDS_PER_DAY)


def partition_name(day: int) -> str:
    return "carbon_receipts_p" + time.strftime("%Y%m%d", time.gmtime(day * SECONDS_PER_DAY))


def create_partition(day: int) -> str:
    start = time.strftime("%Y-%m-%d", time.gmtime(day * SECONDS_PER_DAY))
    end = time.strftime("%Y-%m-%d", time.gmtime((day + 1) * SECONDS_PER_DAY))
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF carbon_receipts "
        f"FOR VALUES FROM ('{start} 00:00:00+00') TO ('{end} 00:00:00+00')"
    )


def partition_day(name: str) -> int | None:
    """The day a partition holds, from its name (None: not one of ours)."""
    digits = name.removeprefix("carbon_receipts_p")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return day_of(calendar.timegm(time.strptime(digits, "%Y%m%d")))
    except ValueError:
        return None
