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


def test_prompt_weight_is_learned_where_half_the_requests_do_not_stream() -> None:
    # A saturating curve (bench seed 7: prompts weigh 0.249 of an output token, the
    # device near its ceiling at the swings' peaks), half the requests not streamed. A
    # non-streamed sequence's tokens, known only in total, were spread evenly over its
    # decode: as many while long prompts slowed every step as in fast decode-only
    # steps, so blocks heavy with prompts looked heavy with output too and the learned
    # weight came out 0.17. Placed at the last steps streams showed before its end
    # (one token per step), the blocks' work is what the server did.
    bench = load_bench()
    simulated = bench.simulate("curve", "nvml-like", seed=7, warmup=200, count=60)
    run, streaming = simulated.run, simulated.streaming
    replay = bench.replay_engine(run, streaming.__getitem__, simulated.world.gpu.device_ids)
    fit = replay.state["gpu"]["cost_model"]["fit"]
    learned = fit["theta"][0] / fit["theta"][1]
    assert learned == pytest.approx(simulated.world.gpu.physics.prefill_weight, rel=0.12)
