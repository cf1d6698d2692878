"""A small run of bench/attribution.py's virtual mode in every physics of the family: the
engine must stay ahead of the naive splits, and conserve energy (seconds)."""

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


@pytest.mark.parametrize("physics", ["additive", "curve", "throttled", "context"])
def test_engine_beats_the_naive_splits_in_every_physics(physics: str) -> None:
    bench = load_bench()
    result = bench.run_case(physics, "nvml-like", seed=1, warmup=120, count=150)
    median = bench.percentile
    for kind in ("stream", "plain"):
        settled = result.errors[f"settled/{kind}"]
        assert settled and result.errors[f"end/{kind}"]
        naive = min(median(result.errors[f"equal/{kind}"], 0.5), median(result.errors[f"time/{kind}"], 0.5))
        assert median(settled, 0.5) * 2 <= naive
    assert result.conservation < 1e-6
