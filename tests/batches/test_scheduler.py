"""The scheduler's choice on forecasts whose answer is known by hand."""

from __future__ import annotations

import pytest

from proxy.batches.scheduler import mean_intensity, plan
from proxy.batches.settings import parse_batches
from proxy.carbon.forecast import ForecastWindow, flat
from proxy.errors import ConfigError

H = 3600.0


def day() -> list[ForecastWindow]:
    # 0-6 h: 400, 6-8 h: 100, 8-10 h: 200, 10-24 h: 500
    return [ForecastWindow(0, 6 * H, 400), ForecastWindow(6 * H, 8 * H, 100), ForecastWindow(8 * H, 10 * H, 200), ForecastWindow(10 * H, 24 * H, 500)]


def test_a_short_batch_starts_at_the_cleanest_window() -> None:
    chosen = plan(day(), 0, 24 * H, 1 * H, 1 * H)
    assert chosen.start_unix == 6 * H and chosen.mean_g_per_kwh == 100 and chosen.now_g_per_kwh == 400


def test_a_long_batch_straddles_the_cleanest_stretch() -> None:
    chosen = plan(day(), 0, 24 * H, 4 * H, 1 * H)  # 6-10 h: (2*100 + 2*200) / 4 = 150
    assert chosen.start_unix == 6 * H and chosen.mean_g_per_kwh == pytest.approx(150)


def test_the_deadline_and_margin_bound_the_wait() -> None:
    chosen = plan(day(), 0, 8 * H, 1 * H, 1 * H)  # must end by 7 h: 6-7 h still fits
    assert chosen.start_unix == 6 * H
    squeezed = plan(day(), 0, 7 * H, 1 * H, 1 * H)  # must end by 6 h: only the 400 stretch
    assert squeezed.start_unix == 0


def test_no_room_or_no_forecast_runs_now() -> None:
    assert plan(day(), 0, 2 * H, 3 * H, 1 * H).start_unix == 0
    assert plan(flat(300, 100, 24 * H), 100, 100 + 24 * H, H, H).start_unix == 100
    assert plan([], 100, 100 + 24 * H, H, H).start_unix == 100


def test_mean_holds_the_last_value_past_the_forecast() -> None:
    assert mean_intensity([ForecastWindow(0, H, 100)], 0, 2 * H) == pytest.approx(100)
    assert mean_intensity(day(), 5 * H, 7 * H) == pytest.approx(250)


@pytest.mark.parametrize(
    "table, key",
    [
        ({"max_lines": 0}, "batches.max_lines"),
        ({"max_concurrency": 1.5}, "batches.max_concurrency"),
        ({"enabled": "yes"}, "batches.enabled"),
        ({"path": ""}, "batches.path"),
        ({"safety_margin_seconds": -1}, "batches.safety_margin_seconds"),
        ({"bogus": 1}, "batches.bogus"),
    ],
)
def test_config_errors_name_the_key(table: dict, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_batches(table)
    assert error.value.key == key


def test_the_store_sits_beside_the_receipts_by_default() -> None:
    assert parse_batches({}, "/var/lib/cp/receipts.db").path == "/var/lib/cp/batches.db"
    assert parse_batches({"enabled": False}).enabled is False
