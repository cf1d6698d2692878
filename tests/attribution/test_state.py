"""Learned attribution state persists in the receipts database and is reloaded at start."""

from __future__ import annotations

import asyncio
import math
import sqlite3
from pathlib import Path

import pytest

from proxy.attribution import AttributionEngine
from proxy.attribution.costmodel import MIN_BLOCKS, Fit, Rates
from proxy.attribution.prior import group_prior, lookup
from proxy.attribution.state import LearnedStateStore, StateKeeper
from proxy.meters.base import EnergySample

FIT = Fit((40.0, 0.0, 12.0, 30.0, 0.0, 5.0), math.inf)


def _taught_engine() -> AttributionEngine:
    """An engine that has learned something: a cost model, idle power, paces."""
    engine = AttributionEngine({"g": ["0", "1"], "h": ["2"]})
    group = engine._groups["g"]
    group.model.set_prior(FIT, MIN_BLOCKS)
    group.model.peak_watts = 420.0
    for k in range(60):  # a minute of idle readings at 80 W (two devices)
        engine.on_sample(EnergySample(float(k), {"0": 40.0 * k, "1": 40.0 * k, "2": 0.0}))
    group.pace.load({"prefill_rates": [4000.0] * 25, "token_gaps": [0.021] * 25})
    return engine


def test_learned_state_round_trips_through_the_receipts_database(tmp_path: Path) -> None:
    path = str(tmp_path / "receipts.db")
    taught = _taught_engine()
    LearnedStateStore(path, {"g": "H100", "h": "A100"}).save(taught.save_state())

    fresh = AttributionEngine({"g": ["0", "1"], "h": ["2"]})
    restored = fresh.load_state(LearnedStateStore(path, {"g": "H100", "h": "A100"}).load())
    assert sorted(restored) == ["g", "h"]
    group = fresh._groups["g"]
    assert group.model.ready and group.model.fit == FIT
    at = Rates(2000.0, 800.0, 1.2e6, 16.0)
    assert group.model.prices(at) == taught._groups["g"].model.prices(at)
    assert fresh.idle_power_watts("g") == pytest.approx(80.0)
    assert group.pace.pace() == taught._groups["g"].pace.pace()
    # Its own table in the receipts file, next to whatever else is there.
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT COUNT(*) FROM attribution_state").fetchone() == (2,)


def test_state_of_other_hardware_or_unreadable_is_learned_again(tmp_path: Path) -> None:
    path = str(tmp_path / "receipts.db")
    LearnedStateStore(path, {"g": "H100"}).save(_taught_engine().save_state())
    # The group now runs on other hardware: its old state does not apply.
    assert LearnedStateStore(path, {"g": "L4"}).load() == {}
    fresh = AttributionEngine({"g": ["0", "1"]})
    assert fresh.load_state({"g": {"version": 999}}) == []
    assert fresh.load_state({"g": {"version": 1, "cost_model": {"terms": "junk"}}}) == []
    assert not fresh._groups["g"].model.ready
    # A database that cannot be opened loses the state, never raises.
    assert LearnedStateStore(str(tmp_path / "missing" / "x.db"), {"g": "H100"}).load() == {}
    LearnedStateStore(str(tmp_path / "missing" / "x.db"), {"g": "H100"}).save({"g": {}})


def test_keeper_loads_at_start_and_saves_at_stop(tmp_path: Path) -> None:
    path = str(tmp_path / "receipts.db")

    async def lifetime(engine: AttributionEngine) -> list[str]:
        keeper = StateKeeper(engine, LearnedStateStore(path, {"g": "H100", "h": "H100"}), every_seconds=3600)
        restored = await keeper.start()
        await keeper.stop()
        return restored

    assert asyncio.run(lifetime(_taught_engine())) == []  # nothing saved yet; saved at stop
    restarted = AttributionEngine({"g": ["0", "1"], "h": ["2"]})
    assert sorted(asyncio.run(lifetime(restarted))) == ["g", "h"]
    assert restarted._groups["g"].model.fit == FIT


def test_device_prior_from_the_model_table() -> None:
    assert lookup("NVIDIA H100 80GB HBM3") == (70.0, 700.0)
    assert lookup("NVIDIA A100-SXM4-40GB") == (55.0, 400.0)
    assert lookup("NVIDIA L40S") == (35.0, 350.0)
    assert lookup("unknown accelerator") is None
    prior = group_prior("H100", devices=2)
    assert prior is not None and prior.idle_watts == 140.0 and prior.board_watts == 1400.0
    nvml = group_prior("H100", devices=2, board_limits_watts=[500.0, 500.0])
    assert nvml is not None and nvml.board_watts == 1000.0 and nvml.source == "nvml"
    engine = AttributionEngine({"g": ["0", "1"]}, prior={"g": prior})
    assert engine.idle_power_watts("g") == 140.0  # before any idle time was seen


def test_what_the_steps_taught_survives_a_restart() -> None:
    """Prefill read from step lengths needs a decode-only step's length and the seconds a
    prompt token adds to a step, learned from streams: a restarted engine keeps them."""
    import json

    engine = AttributionEngine({"g": ["0"]})
    taught = {"step_lengths": [0.021, 0.02, 0.035, 0.02], "seconds_per_prompt_token": [2.0e-5 + i * 1e-7 for i in range(30)]}
    engine._groups["g"].prefill_steps.load(taught)
    restarted = AttributionEngine({"g": ["0"]})
    assert restarted.load_state(json.loads(json.dumps(engine.save_state()))) == ["g"]
    steps = restarted._groups["g"].prefill_steps
    assert steps.shortest() == 0.02
    assert steps.seconds_per_token() == engine._groups["g"].prefill_steps.seconds_per_token() is not None
