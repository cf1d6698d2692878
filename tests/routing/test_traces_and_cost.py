"""Sim intensity traces move like real grids; the learned cost model follows receipts."""

from __future__ import annotations

import pytest

from proxy.carbon.factory import build_intensity_provider
from proxy.carbon.forecast import forecast_of
from proxy.carbon.traces import TraceIntensity
from proxy.routing.cost import LearnedCostModel


def test_traces_have_their_daily_shape() -> None:
    day = 240.0  # a day in four minutes
    ca = TraceIntensity("US-CAL-CISO", day_seconds=day)
    hour = day / 24
    # Solar noon in California (20:00 UTC) against its evening peak (03:00 UTC).
    assert ca.at(20 * hour).g_per_kwh < 0.4 * ca.at(2 * hour).g_per_kwh
    se = [TraceIntensity("SE", day_seconds=day).at(h * hour).g_per_kwh for h in range(24)]
    assert max(se) < 60 and min(se) > 20  # hydro and nuclear: low and nearly flat
    de = TraceIntensity("DE", day_seconds=day)
    days = [[de.at((d * 24 + h) * hour).g_per_kwh for h in range(24)] for d in range(3)]
    assert days[0] != days[1]  # wind makes each day different
    assert max(max(d) for d in days) - min(min(d) for d in days) > 200


def test_a_trace_forecast_is_exact_and_contiguous() -> None:
    trace = build_intensity_provider({"provider": "sim", "zone": "DE", "day_seconds": 2400})
    assert isinstance(trace, TraceIntensity)
    windows = forecast_of(trace, 50.0, 600.0)
    assert windows[0].start_unix == 50.0 and windows[-1].end_unix == 650.0
    assert all(a.end_unix == b.start_unix for a, b in zip(windows, windows[1:]))
    assert len(windows) == 7  # 100 s per simulated hour: a partial one, five whole, a partial
    middle = windows[2]
    assert middle.g_per_kwh == pytest.approx(trace.at((middle.start_unix + middle.end_unix) / 2).g_per_kwh)


def test_table_provider_keeps_a_flat_line() -> None:
    table = build_intensity_provider({"provider": "table", "zone": "SE"})
    (window,) = forecast_of(table, 0.0, 86400.0)
    assert window.g_per_kwh == table.current().g_per_kwh


def test_learned_cost_model_follows_settled_receipts() -> None:
    model = LearnedCostModel(prior_joules_per_token=2.0, prefill_weight=0.1)
    assert model.predict_joules("a", 0, 100) == 200.0  # the prior, before any data
    for _ in range(50):
        model.observe("a", "m", 1000, 100, joules=(0.1 * 1000 + 100) * 3.0, embodied_grams=0.2)
    assert model.predict_joules("a", 0, 100) == pytest.approx(300.0)
    assert model.predict_embodied_grams("a", 1000, 100) == pytest.approx(0.2)
    # An upstream with no data borrows the others' mean until it has its own.
    assert model.predict_joules("b", 0, 100) == pytest.approx(300.0)
    assert model.samples("a") == 50 and model.samples("b") == 0


def test_expected_output_uses_max_tokens_and_the_models_history() -> None:
    model = LearnedCostModel(default_output_tokens=256)
    assert model.expected_output_tokens("m", None) == 256
    assert model.expected_output_tokens("m", 64) == 64
    for _ in range(20):
        model.observe("a", "m", 10, 40, joules=10.0, embodied_grams=0.0)
    assert model.expected_output_tokens("m", None) == 40
    assert model.expected_output_tokens("m", 1000) == 40  # a generous cap is not the length
    assert model.expected_output_tokens("m", 16) == 16
