"""`carbon-proxy report --dsn ...`: the same report over the whole fleet's PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.receipts.report import Report, _totals

GROUPS = {
    "model": "coalesce(model, '(none)')",
    "tenant": "tenant",
    "upstream": "upstream",
    "day": "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}
_SUMS = (
    "count(*), sum(coalesce(prompt_tokens, 0)), sum(coalesce(output_tokens, 0)), sum(coalesce(images, 0)), "
    "sum(energy_joules), sum(coalesce(host_energy_joules, 0)), sum(energy_joules * pue), "
    "sum(operational_grams), sum(embodied_grams), sum(co2e_grams), sum((status = 'provisional')::int), {avoided}"
)
_AVOIDED = "sum(coalesce(avoided_grams, 0))"
"""A table no routing-aware proxy has written to yet has no avoided_grams column: 0."""


def build_fleet_report(
    dsn: str, *, since_unix: float, until_unix: float, by: str, tenant: str | None = None, model: str | None = None
) -> Report:
    return asyncio.run(_build(dsn, since_unix, until_unix, by, tenant, model))


async def _build(dsn: str, since: float, until: float, by: str, tenant: str | None, model: str | None) -> Report:
    import asyncpg

    # started_at is the partition key: the range prunes partitions outside the period.
    where = "started_at >= to_timestamp($1) AND started_at < to_timestamp($2) AND ($3::text IS NULL OR tenant = $3) AND ($4::text IS NULL OR model = $4)"
    params: list[Any] = [since, until, tenant, model]
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        exists = await conn.fetchval("SELECT to_regclass('carbon_receipts') IS NOT NULL")
        if not exists:
            return Report(since, until, by, [], _totals("TOTAL", [0] * 12), [], [])
        has_avoided = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'carbon_receipts' AND column_name = 'avoided_grams')"
        )
        sums = _SUMS.format(avoided=_AVOIDED if has_avoided else "0")
        order = "key" if by == "day" else "sum(co2e_grams) DESC, key"
        rows = await conn.fetch(f"SELECT {GROUPS[by]} AS key, {sums} FROM carbon_receipts WHERE {where} GROUP BY key ORDER BY {order}", *params)
        groups = [_totals(str(row[0]), [_plain(v) for v in row[1:]]) for row in rows]
        total = _totals("TOTAL", [_plain(v) for v in await conn.fetchrow(f"SELECT {sums} FROM carbon_receipts WHERE {where}", *params)])
        basis_rows = await conn.fetch(f"SELECT basis, sum(energy_joules), count(*) FROM carbon_receipts WHERE {where} GROUP BY basis", *params)
        bases = [(str(b), float(j or 0), int(n)) for b, j, n in basis_rows]
        upstreams = [str(r[0]) for r in await conn.fetch(f"SELECT DISTINCT upstream FROM carbon_receipts WHERE {where}", *params)]
    finally:
        await conn.close()
    return Report(since, until, by, groups, total, bases, upstreams)


def _plain(value: Any) -> Any:
    """numeric (PostgreSQL's sum of bigint) as a float or int for the shared formatters."""
    if value is None or isinstance(value, (int, float)):
        return value
    return float(value)
