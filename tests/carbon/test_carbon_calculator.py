"""`carbon-proxy estimate`: the DESIGN worked example, JSON, and exit code 2 naming the flag."""

from __future__ import annotations

import argparse
import io

import orjson
import pytest

from proxy.carbon.calculator import add_arguments, run

EXAMPLE = ["--gpus", "4", "--power-w", "300", "--hours", "10", "--pue", "1.5", "--intensity", "450"]


def estimate(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="carbon-proxy estimate")
    add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    code = run(parser.parse_args(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_worked_example_table() -> None:
    code, out, err = estimate(EXAMPLE)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "4 x 300 W x 10 h, PUE 1.5, 450 gCO2e/kWh (constant)"
    assert "energy (raw)      12 kWh" in out
    assert "energy (PUE 1.5)  18 kWh" in out
    assert "operational       8.1 kg CO2e" in out
    assert "total             8.1 kg CO2e" in out
    assert "embodied          off" in out


def test_worked_example_json() -> None:
    code, out, _ = estimate([*EXAMPLE, "--json"])
    data = orjson.loads(out)
    assert code == 0
    assert data["energy_kwh"] == pytest.approx(12.0)
    assert data["energy_with_pue_kwh"] == pytest.approx(18.0)
    assert data["operational_kg_co2e"] == pytest.approx(8.1)
    assert data["embodied_kg_co2e"] is None and data["total_kg_co2e"] == pytest.approx(8.1)


def test_embodied_adds_its_own_row_and_to_the_total() -> None:
    code, out, _ = estimate([*EXAMPLE, "--embodied", "--json"])
    data = orjson.loads(out)
    assert code == 0 and data["device_model"] == "H100"
    assert data["operational_kg_co2e"] == pytest.approx(8.1)
    assert data["embodied_kg_co2e"] == pytest.approx(0.5436, abs=1e-4)
    assert data["total_kg_co2e"] == pytest.approx(8.1 + data["embodied_kg_co2e"])
    _, table, _ = estimate([*EXAMPLE, "--embodied"])
    assert "embodied          0.5436 kg CO2e (H100)" in table


def test_zone_intensity_and_cloud_pue_default() -> None:
    code, out, _ = estimate(["--gpus", "1", "--power-w", "1000", "--hours", "1", "--intensity", "gcp:europe-west4", "--json"])
    data = orjson.loads(out)
    assert code == 0 and data["intensity_source"] == "table:gcp:europe-west4"
    assert data["pue"] == 1.10 and data["operational_kg_co2e"] == pytest.approx(1.1 * 236 / 1000)
    _, out, _ = estimate(["--power-w", "1000", "--hours", "1", "--json"])
    assert orjson.loads(out)["pue"] == 1.58 and orjson.loads(out)["intensity_g_per_kwh"] == 475


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--gpus", "0", "--power-w", "300", "--hours", "1"], "--gpus"),
        (["--power-w", "0", "--hours", "1"], "--power-w"),
        (["--power-w", "300", "--hours", "-1"], "--hours"),
        (["--power-w", "300", "--hours", "nan"], "--hours"),
        (["--power-w", "300", "--hours", "1", "--pue", "0.8"], "--pue"),
        (["--power-w", "300", "--hours", "1", "--pue", "fast"], "--pue"),
        (["--power-w", "300", "--hours", "1", "--intensity", "XX"], "--intensity"),
        (["--power-w", "300", "--hours", "1", "--intensity", "-5"], "--intensity"),
        (["--power-w", "300", "--hours", "1", "--embodied", "--device-model", "Z9"], "--device-model"),
        (["--power-w", "300", "--hours", "1", "--embodied", "--lifetime-years", "0"], "--lifetime-years"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(argv: list[str], flag: str) -> None:
    code, out, err = estimate(argv)
    assert code == 2 and out == ""
    assert err.startswith(f"carbon-proxy estimate: {flag}: ")


def test_unparseable_numbers_are_argparse_usage_errors() -> None:
    with pytest.raises(SystemExit) as info:
        estimate(["--gpus", "four", "--power-w", "300", "--hours", "1"])
    assert info.value.code == 2
