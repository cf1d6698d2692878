"""`carbon-proxy report --dsn`: totals and the model card over every replica's receipts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import orjson

from proxy.receipts.postgres import Postgres
from proxy.receipts.sqlite import _row_of

from receipts_fakes import make_receipt


def report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "report", *args], capture_output=True, text=True, timeout=60)


async def test_the_report_reads_the_whole_fleet(dsn: str) -> None:
    postgres = Postgres(dsn)
    now = time.time()
    for replica, model, count in (("a", "llama", 3), ("b", "llama", 2), ("b", "mistral", 4)):
        rows = [
            _row_of(make_receipt(f"{replica}{model}{i}", receipt_id=f"{replica}-{model}-{i}", model=model, status="final",
                                 started_unix=now - 60, co2e_grams=0.5, output_tokens=100))
            for i in range(count)
        ]  # fmt: skip
        await postgres.upsert(rows, replica)
    await postgres.close()

    done = await asyncio.to_thread(report, "--dsn", dsn, "--since", "1h", "--format", "json")
    assert done.returncode == 0, done.stderr
    data = orjson.loads(done.stdout)
    by_model = {g["key"]: g for g in data["groups"]}
    assert by_model["llama"]["requests"] == 5 and by_model["mistral"]["requests"] == 4
    assert data["total"]["co2e_grams"] == 4.5

    card = await asyncio.to_thread(report, "--dsn", dsn, "--since", "1h", "--model", "mistral", "--format", "model-card")
    assert card.returncode == 0, card.stderr
    assert "over 4 requests" in card.stdout and "| mistral | 4 | 400 |" in card.stdout

    bad = await asyncio.to_thread(report, "--dsn", dsn.rsplit("/", 1)[0] + "/no_such_db", "--format", "json")
    assert bad.returncode == 2 and "--dsn" in bad.stderr and "Traceback" not in bad.stderr
