"""`carbon-proxy batches`: the batches in the store (SQLite, or the fleet's PostgreSQL when
[receipts] backend = "postgres"), with what each one avoided."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from proxy.batches.settings import BatchSettings, open_store, parse_batches, with_fleet
from proxy.config import load_config
from proxy.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the proxy's TOML config: its [batches].path (else beside [receipts].path)")
    parser.add_argument("--db", help="the batch database (default: from --config, else batches.db)")
    parser.add_argument("--dsn", help="the fleet's PostgreSQL (default with --config: its [receipts] dsn when backend = postgres)")
    parser.add_argument("--format", default="table", choices=("table", "json"), help="output format (default table)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    path, dsn = args.db, getattr(args, "dsn", None)
    if path is None and dsn is None and args.config:
        config = load_config(args.config)
        settings = with_fleet(parse_batches(config.batches, config.receipts.path), config.receipts)
        path, dsn = settings.path, settings.dsn
    if dsn is None:
        path = path or "batches.db"
        if path == ":memory:":
            raise ConfigError("batches.path", "':memory:' keeps no batches to list; give --db PATH")
        if not Path(str(path)).exists():
            raise ConfigError("--db", f"no batch database at {path!r}")
    batches = asyncio.run(_read(BatchSettings(path=path, dsn=dsn)))
    if args.format == "json":
        json.dump(batches, out, indent=2)
        out.write("\n")
        return 0
    out.write(f"{'batch':<30} {'status':<11} {'created (UTC)':<17} {'lines':>6} {'ok':>6} {'failed':>6} {'emitted g':>11} {'run-now g':>11} {'avoided g':>11}\n")
    for b in batches:
        counts, carbon = b["request_counts"], b.get("carbon") or {}
        created = datetime.fromtimestamp(b["created_at"], timezone.utc).strftime("%Y-%m-%d %H:%M")
        out.write(
            f"{b['id']:<30} {b['status']:<11} {created:<17} {counts['total']:>6} {counts['completed']:>6} {counts['failed']:>6}"
            f" {_grams(carbon.get('emitted_grams'))} {_grams(carbon.get('run_now_grams'))} {_grams(carbon.get('avoided_grams'))}\n"
        )
    avoided = sum(b.get("carbon", {}).get("avoided_grams") or 0.0 for b in batches)
    out.write(f"{len(batches)} batches; {avoided:.4f} gCO2e avoided in all\n")
    return 0


def _grams(value: Any) -> str:
    return f"{value:>11.4f}" if isinstance(value, (int, float)) else f"{'-':>11}"


async def _read(settings: BatchSettings) -> list[dict[str, Any]]:
    store = open_store(settings)
    await store.start()
    try:
        return await store.all_batches()
    finally:
        await store.close()
