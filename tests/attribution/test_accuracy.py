"""A small run of bench/attribution.py's virtual mode: the engine must stay far ahead of
splitting each interval equally, and conserve energy (a few seconds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "attribution.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_attribution", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("mix", "median_at_most"), [("streaming", 0.03), ("non-streaming", 0.08), ("mixed", 0.05)])
def test_engine_beats_equal_split_on_a_small_workload(mix: str, median_at_most: float) -> None:
    bench = load_bench()
    result, _ = bench.run_virtual_mix(mix, count=120, seed=1, warmup=100)
    engine = result.methods["engine"]
    equal = result.methods["equal split"]
    assert len(engine.errors) == 120
    assert engine.conservation < 1e-9
    assert engine.median <= median_at_most
    assert engine.median * 5 <= equal.median
    assert engine.p90 * 3 <= equal.p90
