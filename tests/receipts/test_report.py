"""`carbon-proxy report`: totals by model, tenant, upstream or day in each format."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import orjson
import pytest
from receipts_fakes import make_receipt

from proxy.cli import main
from proxy.receipts.sqlite import SqliteReceiptStore

NOW = time.time()


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    path = tmp_path / "r.db"
    store = SqliteReceiptStore(str(path))
    await store.start()
    basis = "meter=nvml; intensity=electricitymaps:DE; pue=1.2; status=final"
    for i in range(3):
        store.put(make_receipt(f"a{i}", model="llama", tenant="team-a", output_tokens=1000, co2e_grams=1.0, energy_joules=3600.0,
                               operational_grams=0.9, embodied_grams=0.1, status="final", basis=basis, started_unix=NOW - 60))  # fmt: skip
    store.put(make_receipt("b0", model="mistral", tenant="team-b", upstream="other", output_tokens=500, co2e_grams=4.0,
                           energy_joules=7200.0, started_unix=NOW - 3600))  # fmt: skip
    store.put(make_receipt("old", model="llama", started_unix=NOW - 3 * 86400, co2e_grams=100.0))
    await store.close()
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["report", *argv]) == 0
    return capsys.readouterr().out


def test_table_by_model_with_totals(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "--db", str(db), "--since", "24h", "--by", "model")
    lines = out.splitlines()
    assert lines[0].startswith("receipts ") and "by model" in lines[0]
    assert lines[1].split()[:3] == ["model", "requests", "output"]
    assert lines[2].split()[:2] == ["mistral", "1"]  # biggest emitter first
    assert lines[3].split()[:3] == ["llama", "3", "3000"]
    assert lines[-1].split()[:2] == ["TOTAL", "4"]  # the 3-day-old receipt is outside the period


def test_csv_by_tenant(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = list(csv.DictReader(io.StringIO(run(capsys, "--db", str(db), "--by", "tenant", "--format", "csv"))))
    by_tenant = {row["key"]: row for row in rows}
    assert set(by_tenant) == {"team-a", "team-b"}
    assert float(by_tenant["team-a"]["co2e_grams"]) == pytest.approx(3.0)
    assert float(by_tenant["team-a"]["grams_per_1k_output_tokens"]) == pytest.approx(1.0)
    assert float(by_tenant["team-a"]["sci_grams_per_request"]) == pytest.approx(1.0)
    assert int(by_tenant["team-b"]["provisional"]) == 1


def test_json_by_upstream_and_by_day(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = orjson.loads(run(capsys, "--db", str(db), "--by", "upstream", "--format", "json", "--since", "7d"))
    assert {g["key"]: g["requests"] for g in data["groups"]} == {"llama": 4, "other": 1}
    assert data["total"]["co2e_grams"] == pytest.approx(107.0)
    assert data["total"]["energy_kwh"] == pytest.approx((3 * 3600 + 7200 + 36) / 3.6e6)
    days = orjson.loads(run(capsys, "--db", str(db), "--by", "day", "--format", "json", "--since", "7d"))
    expected = sorted({time.strftime("%Y-%m-%d", time.gmtime(NOW - ago)) for ago in (60, 3600, 3 * 86400)})
    assert [g["key"] for g in days["groups"]] == expected


def test_model_card_markdown(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[receipts]\npath = "{db}"\n'
        '[[upstreams]]\nname = "llama"\nurl = "http://127.0.0.1:8000"\ndevices = ["0", "1"]\ndevice_model = "H100"\n'
    )
    out = run(capsys, "--config", str(config), "--format", "model-card", "--model", "llama")
    assert out.startswith("## Environmental impact (inference)")
    assert "| Hardware | 2 x H100 (upstream `llama`) |" in out
    assert "| Carbon emissions | 3 g CO2e: 2.7 g operational, 0.3 g embodied |" in out
    assert "| Per 1k output tokens | 1 g CO2e (3000 output tokens) |" in out
    assert "| SCI per request | 1 g CO2e (ISO/IEC 21031:2024, R = one request) |" in out
    assert "`electricitymaps:DE`" in out and "location-based" in out
    assert "### Method" in out and "### Limits" in out
    assert "Host energy (CPU, memory, network) was not metered" in out


def test_bad_arguments_exit_2(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--db", str(tmp_path / "missing.db")]) == 2
    assert main(["report", "--db", str(db), "--since", "yesterday-ish"]) == 2
    assert "--since" in capsys.readouterr().err
