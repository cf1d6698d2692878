"""A small run of bench/routing.py: the fleet in virtual time behind the real router.

No timing assertions: virtual time only. Checks that the bench's figures are consistent
(the decomposition adds up, every request is served) and that the carbon policy cuts
grams on the bench's traces where round robin cannot.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "routing.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_routing", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_bench_run_adds_up() -> None:
    bench = _bench()
    results = bench.run_all(runs=1, day_seconds=240.0, rate=4.0, timeout_seconds=10.0)
    base, carbon = results["round_robin"][0], results["carbon"][0]
    assert base["requests"] == carbon["requests"] > 500
    assert carbon["error_rate"] == base["error_rate"] == 0.0
    parts = bench.decompose(base, carbon)
    assert sum(parts.values()) == pytest.approx(base["grams"] - carbon["grams"], rel=1e-9)
    assert carbon["grams"] < 0.8 * base["grams"] and carbon["fleet_grams"] < base["fleet_grams"]
    assert parts["grid"] > 0  # part of it is from cleaner grids
    table = bench.report(results, argparse.Namespace(day_seconds=240.0, rate=4.0))
    assert "| carbon |" in table and "cleaner grids" in table
