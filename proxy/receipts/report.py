"""`carbon-proxy report`: totals from the receipts database over a period.

    carbon-proxy report --config carbon-proxy.toml --since 24h --by model --format table
    carbon-proxy report --db carbon-proxy.db --since 2024-05-01 --until 2024-06-01 --format model-card

Reads the same SQLite file the proxy writes (read-only, so it runs beside a live proxy).
Groups by model, tenant, upstream or UTC day; prints a table, CSV, JSON, or a Markdown
emissions section for a model card (see proxy.receipts.model_card).
"""

from __future__ import annotations

import argparse
import csv
import re
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence, TextIO

import orjson

from proxy.config import Config, load_config
from proxy.errors import ConfigError
from proxy.receipts import schema

GROUPS = {
    "model": "coalesce(model, '(none)')",
    "tenant": "tenant",
    "upstream": "upstream",
    "day": "strftime('%Y-%m-%d', started_unix, 'unixepoch')",
}
FORMATS = ("table", "csv", "json", "model-card")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
JOULES_PER_KWH = 3.6e6


@dataclass(slots=True)
class Totals:
    key: str
    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    images: int = 0
    energy_joules: float = 0.0
    """IT energy (devices + host share), before PUE."""
    host_energy_joules: float = 0.0
    facility_energy_joules: float = 0.0
    """energy x PUE."""
    operational_grams: float = 0.0
    embodied_grams: float = 0.0
    co2e_grams: float = 0.0
    provisional: int = 0
    avoided_grams: float = 0.0
    """Predicted grams the routing policy avoided against its baseline (X-Carbon-Route);
    a counterfactual, not a measurement. 0 where no pool routed."""

    @property
    def grams_per_1k_output_tokens(self) -> float | None:
        return self.co2e_grams / self.output_tokens * 1000 if self.output_tokens else None

    @property
    def grams_per_request(self) -> float | None:
        """SCI with R = one request: (E x PUE x I + M) / R."""
        return self.co2e_grams / self.requests if self.requests else None

    @property
    def joules_per_output_token(self) -> float | None:
        return self.energy_joules / self.output_tokens if self.output_tokens else None

    @property
    def intensity_g_per_kwh(self) -> float | None:
        """Energy-weighted grid intensity: operational grams per facility kWh."""
        return self.operational_grams / (self.facility_energy_joules / JOULES_PER_KWH) if self.facility_energy_joules else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["energy_kwh"] = self.energy_joules / JOULES_PER_KWH
        data["facility_energy_kwh"] = self.facility_energy_joules / JOULES_PER_KWH
        data["grams_per_1k_output_tokens"] = self.grams_per_1k_output_tokens
        data["sci_grams_per_request"] = self.grams_per_request
        data["joules_per_output_token"] = self.joules_per_output_token
        data["intensity_g_per_kwh"] = self.intensity_g_per_kwh
        return data


@dataclass(slots=True)
class Report:
    since_unix: float
    until_unix: float
    by: str
    groups: list[Totals]
    total: Totals
    bases: list[tuple[str, float, int]]
    """(basis, joules, requests) for each distinct X-Emissions-Basis in the period."""
    upstreams: list[str]


def parse_when(text: str, now_unix: float, flag: str) -> float:
    """'24h', '7d', '30m', '2w' ago, or an ISO date/time (UTC unless it names a zone)."""
    match = _DURATION.match(text.strip())
    if match:
        return now_unix - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(flag, f"expected a duration such as 24h, 7d, 30m or an ISO date such as 2024-05-01; got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _filters(since: float, until: float, tenant: str | None, model: str | None) -> tuple[str, list[Any]]:
    where = "started_unix >= ? AND started_unix < ?"
    params: list[Any] = [since, until]
    if tenant is not None:
        where += " AND tenant = ?"
        params.append(tenant)
    if model is not None:
        where += " AND model = ?"
        params.append(model)
    return where, params


_SUMS = (
    "count(*), sum(coalesce(prompt_tokens, 0)), sum(coalesce(output_tokens, 0)), sum(coalesce(images, 0)), "
    "sum(energy_joules), sum(coalesce(host_energy_joules, 0)), sum(energy_joules * pue), "
    "sum(operational_grams), sum(embodied_grams), sum(co2e_grams), sum(status = 'provisional'), {avoided}"
)
_AVOIDED = "sum(coalesce(avoided_grams, 0))"
"""Databases written before routing have no avoided_grams column (the report opens them
read-only and cannot add it): they read 0."""


def _totals(key: str, row: Sequence[Any]) -> Totals:
    count, prompt, output, images, energy, host, facility, operational, embodied, co2e, provisional, avoided = row
    return Totals(
        key=key,
        requests=int(count or 0),
        prompt_tokens=int(prompt or 0),
        output_tokens=int(output or 0),
        images=int(images or 0),
        energy_joules=float(energy or 0),
        host_energy_joules=float(host or 0),
        facility_energy_joules=float(facility or 0),
        operational_grams=float(operational or 0),
        embodied_grams=float(embodied or 0),
        co2e_grams=float(co2e or 0),
        provisional=int(provisional or 0),
        avoided_grams=float(avoided or 0),
    )


def build_report(
    db_path: str, *, since_unix: float, until_unix: float, by: str, tenant: str | None = None, model: str | None = None
) -> Report:
    conn = schema.connect(db_path, busy_timeout_ms=5_000, read_only=True)
    try:
        where, params = _filters(since_unix, until_unix, tenant, model)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(receipts)")}
        sums = _SUMS.format(avoided=_AVOIDED if "avoided_grams" in columns else "0")
        order = "key" if by == "day" else "sum(co2e_grams) DESC, key"
        rows = conn.execute(f"SELECT {GROUPS[by]} AS key, {sums} FROM receipts WHERE {where} GROUP BY key ORDER BY {order}", params)
        groups = [_totals(str(row[0]), row[1:]) for row in rows]
        total = _totals("TOTAL", conn.execute(f"SELECT {sums} FROM receipts WHERE {where}", params).fetchone())
        bases = [
            (str(b), float(j or 0), int(n))
            for b, j, n in conn.execute(f"SELECT basis, sum(energy_joules), count(*) FROM receipts WHERE {where} GROUP BY basis", params)
        ]
        upstreams = [str(u) for (u,) in conn.execute(f"SELECT DISTINCT upstream FROM receipts WHERE {where}", params)]
    finally:
        conn.close()
    return Report(since_unix, until_unix, by, groups, total, bases, upstreams)


# -- output ------------------------------------------------------------------------------

TABLE_COLUMNS = (
    ("requests", "requests", "{:d}"),
    ("output tok", "output_tokens", "{:d}"),
    ("kWh (IT)", "energy_kwh", "{:.4g}"),
    ("gCO2e", "co2e_grams", "{:.4g}"),
    ("operational g", "operational_grams", "{:.4g}"),
    ("embodied g", "embodied_grams", "{:.4g}"),
    ("g/1k tok", "grams_per_1k_output_tokens", "{:.4g}"),
    ("g/request", "sci_grams_per_request", "{:.4g}"),
    ("avoided g (pred.)", "avoided_grams", "{:.4g}"),
    ("provisional", "provisional", "{:d}"),
)
CSV_FIELDS = (
    "key", "requests", "prompt_tokens", "output_tokens", "images", "energy_joules", "host_energy_joules", "energy_kwh",
    "facility_energy_kwh", "operational_grams", "embodied_grams", "co2e_grams", "grams_per_1k_output_tokens",
    "sci_grams_per_request", "joules_per_output_token", "intensity_g_per_kwh", "provisional", "avoided_grams",
)  # fmt: skip


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_period(report: Report) -> str:
    since = time.strftime("%Y-%m-%d %H:%M", time.gmtime(report.since_unix))
    until = time.strftime("%Y-%m-%d %H:%M", time.gmtime(report.until_unix))
    return f"{since} to {until} UTC"


def write_table(report: Report, out: TextIO) -> None:
    header = [report.by] + [title for title, _, _ in TABLE_COLUMNS]
    lines = [[t.key] + [_cell(t.as_dict()[name], fmt) for _, name, fmt in TABLE_COLUMNS] for t in report.groups]
    total = report.total.as_dict()
    lines.append(["TOTAL"] + [_cell(total[name], fmt) for _, name, fmt in TABLE_COLUMNS])
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out.write(f"receipts {format_period(report)}, by {report.by}\n")
    for i, row in enumerate([header, *lines]):
        if i == len(lines):  # a rule above the total
            out.write("  ".join("-" * w for w in widths) + "\n")
        out.write("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))) + "\n")


def write_csv(report: Report, out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for totals in report.groups:
        writer.writerow(totals.as_dict())


def write_json(report: Report, out: TextIO) -> None:
    data = {
        "since_unix": report.since_unix,
        "until_unix": report.until_unix,
        "by": report.by,
        "groups": [t.as_dict() for t in report.groups],
        "total": report.total.as_dict(),
    }
    out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


# -- command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the proxy's TOML config: its [receipts].path and its upstreams' hardware")
    parser.add_argument("--db", help="receipts database (default: [receipts].path of --config, else carbon-proxy.db)")
    parser.add_argument("--dsn", help="the fleet's PostgreSQL (default with --config: its [receipts] dsn when backend = postgres)")
    parser.add_argument("--since", default="24h", help="start: 24h, 7d, 30m, 2w ago, or an ISO date (UTC); default 24h")
    parser.add_argument("--until", default=None, help="end, same forms as --since (default: now)")
    parser.add_argument("--by", default="model", choices=sorted(GROUPS), help="group by (default model)")
    parser.add_argument("--format", default="table", choices=FORMATS, help="output format (default table)")
    parser.add_argument("--tenant", default=None, help="only this tenant's requests")
    parser.add_argument("--model", default=None, help="only this model's requests (e.g. for its model card)")


def _db_path(args: argparse.Namespace, config: Config | None) -> str:
    path = args.db or (config.receipts.path if config is not None else "carbon-proxy.db")
    if path == ":memory:":
        raise ConfigError("receipts.path", "':memory:' keeps no receipts to report on; give --db PATH")
    if not Path(path).is_file():
        raise ConfigError("--db", f"no receipts database at {path!r}")
    return path


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    config = load_config(args.config) if args.config else None
    dsn = args.dsn
    if dsn is None and config is not None and not args.db and config.receipts.backend == "postgres":
        from proxy.receipts.backend import resolve_dsn

        dsn = resolve_dsn(config.receipts.dsn, config.receipts.dsn_env)
    path = "" if dsn else _db_path(args, config)
    now = time.time()
    since = parse_when(args.since, now, "--since")
    until = parse_when(args.until, now, "--until") if args.until else now
    if until <= since:
        raise ConfigError("--until", "must be after --since")
    if dsn:
        from proxy.receipts.fleet_report import build_fleet_report

        try:
            report = build_fleet_report(dsn, since_unix=since, until_unix=until, by=args.by, tenant=args.tenant, model=args.model)
        except Exception as exc:  # unreachable, refused, no such database: say so, no traceback
            raise ConfigError("--dsn", f"cannot read receipts from the fleet database: {type(exc).__name__}: {exc}") from None
    else:
        report = _local_report(path, since, until, args)
    _write(report, args.format, config, out)
    return 0


def _local_report(path: str, since: float, until: float, args: argparse.Namespace) -> Report:
    try:
        return build_report(path, since_unix=since, until_unix=until, by=args.by, tenant=args.tenant, model=args.model)
    except sqlite3.Error as exc:
        raise ConfigError("--db", f"cannot read receipts from {path!r}: {exc}") from None


def _write(report: Report, format: str, config: Config | None, out: TextIO) -> None:
    if format == "table":
        write_table(report, out)
    elif format == "csv":
        write_csv(report, out)
    elif format == "json":
        write_json(report, out)
    else:
        from proxy.receipts.model_card import write_model_card

        write_model_card(report, config, out)
