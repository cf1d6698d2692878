"""The report's avoided-grams column: the sum of the receipts' predicted avoided grams."""

from __future__ import annotations

import csv
import io
import sqlite3
import time
from pathlib import Path

import pytest
from receipts_fakes import make_receipt

from proxy.cli import main
from proxy.receipts.sqlite import SqliteReceiptStore

NOW = time.time()


def _report(capsys: pytest.CaptureFixture[str], db: Path) -> dict[str, dict[str, str]]:
    assert main(["report", "--db", str(db), "--since", "24h", "--by", "upstream", "--format", "csv"]) == 0
    return {row["key"]: row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}


async def test_avoided_grams_add_up_by_upstream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"
    store = SqliteReceiptStore(str(db))
    await store.start()
    avoided = {"nordic": [0.5, 0.25, -0.125], "central": [0.0]}
    for upstream, values in avoided.items():
        for i, grams in enumerate(values):
            receipt = make_receipt(f"{upstream}{i}", upstream=upstream, started_unix=NOW - 60, status="final")
            receipt.route = f"upstream={upstream}; avoided_grams={grams}; counterfactual=predicted"
            receipt.avoided_grams = grams
            store.put(receipt)
    store.put(make_receipt("unrouted", upstream="solo", started_unix=NOW - 60))
    await store.close()
    rows = _report(capsys, db)
    assert float(rows["nordic"]["avoided_grams"]) == pytest.approx(0.625)
    assert float(rows["solo"]["avoided_grams"]) == 0.0
    assert main(["report", "--db", str(db), "--since", "24h", "--by", "upstream"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "avoided g (pred.)" in table[1]
    assert table[-1].split()[0] == "TOTAL" and float(table[-1].split()[-2]) == pytest.approx(0.625)


async def test_a_database_from_before_routing_reads_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "old.db"
    store = SqliteReceiptStore(str(db))
    await store.start()
    store.put(make_receipt("a", upstream="u", started_unix=NOW - 60))
    await store.close()
    with sqlite3.connect(db) as conn:  # as a file written by an older version would be
        conn.execute("ALTER TABLE receipts DROP COLUMN avoided_grams")
    assert float(_report(capsys, db)["u"]["avoided_grams"]) == 0.0
