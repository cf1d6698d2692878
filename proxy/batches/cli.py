"""`carbon-proxy batches`: the batches in the store, with what each one avoided."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from proxy.batches.settings import parse_batches
from proxy.batches.store import BatchStore
from proxy.config import load_config
from proxy.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the proxy's TOML config: its [batches].path (else beside [receipts].path)")
    parser.add_argument("--db", help="the batch database (default: from --config, else batches.db)")
    parser.add_argument("--format", default="table", choices=("table", "json"), help="output format (default table)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    path = args.db
    if path is None and args.config:
        config = load_config(args.config)
        path = parse_batches(config.batches, config.receipts.path).path
    path = path or "batches.db"
    if path == ":memory:":
        raise ConfigError("batches.path", "':memory:' keeps no batches to list; give --db PATH")
    if not Path(str(path)).exists():
        raise ConfigError("--db", f"no batch database at {path!r}")
    batches = asyncio.run(_read(str(path)))
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


async def _read(path: str) -> list[dict[str, Any]]:
    store = BatchStore(path)
    await store.start()
    try:
        return await store.all_batches()
    finally:
        await store.close()
