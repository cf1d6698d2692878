"""One forecast interface for the router and the batch scheduler (proxy.carbon.forecast)."""

from __future__ import annotations

import time

from carbon_fakes import EM_TOKEN, FAST, FakeApi, Reply, running
from carbon_recorded import em_forecast, em_latest, hour_start
from proxy.carbon.credentials import Secret
from proxy.carbon.forecast import ForecastWindow, forecast_of, windows_from_points
from proxy.carbon.intensity import ConstantIntensity
from proxy.carbon.providers import ElectricityMapsProvider
from proxy.carbon.table import TableIntensity


def test_a_source_that_does_not_move_is_one_flat_window() -> None:
    assert forecast_of(ConstantIntensity(120), 1000.0, 3600.0) == [ForecastWindow(1000.0, 4600.0, 120.0, False)]
    table = TableIntensity("FRA")
    (window,) = forecast_of(table, 0.0, 60.0)
    assert (window.start_unix, window.end_unix, window.g_per_kwh) == (0.0, 60.0, table.current().g_per_kwh)


def test_points_become_contiguous_windows_clipped_to_the_horizon() -> None:
    points = [(0.0, 300.0, False), (3600.0, 250.0, True), (7200.0, 200.0, True)]
    windows = windows_from_points(points, 1800.0, 3 * 3600.0)
    assert windows == [
        ForecastWindow(1800.0, 3600.0, 300.0, False),
        ForecastWindow(3600.0, 7200.0, 250.0, True),
        ForecastWindow(7200.0, 1800.0 + 3 * 3600.0, 200.0, True),
    ]
    # Unpacks as the plain (start, end, g/kWh) triple the scheduler reads.
    start, end, g, _ = windows[0]
    assert (start, end, g) == (1800.0, 3600.0, 300.0)
    assert windows_from_points(points, 1800.0, 600.0) == [ForecastWindow(1800.0, 2400.0, 300.0, False)]


async def test_electricitymaps_forecast_reaches_the_interface(fake_api: FakeApi) -> None:
    now = time.time()
    hour = hour_start(now)
    fake_api.script("/v3/carbon-intensity/latest", Reply(json=em_latest("DE", 300, hour)))
    fake_api.script("/v3/carbon-intensity/forecast", Reply(json=em_forecast("DE", [(hour, 999), (hour + 3600, 250), (hour + 7200, 200)])))
    provider = ElectricityMapsProvider("DE", Secret(EM_TOKEN), fallback=TableIntensity("DEU"), base_url=f"{fake_api.url}/v3", forecast=True, **FAST)
    async with running(provider):
        windows = forecast_of(provider, now, 4 * 3600.0)
    assert [w.g_per_kwh for w in windows] == [300, 250, 200]
    assert windows[0].start_unix == now and windows[-1].end_unix == now + 4 * 3600.0
    assert [w.estimated for w in windows] == [False, True, True]
    assert all(a.end_unix == b.start_unix for a, b in zip(windows, windows[1:]))


async def test_no_data_yet_is_the_fallback_held_flat(refused_url: str) -> None:
    provider = ElectricityMapsProvider("DE", Secret(EM_TOKEN), fallback=TableIntensity("DEU"), base_url=refused_url, **FAST)
    async with running(provider):
        (window,) = forecast_of(provider, 10.0, 100.0)
    assert (window.g_per_kwh, window.estimated) == (TableIntensity("DEU").current().g_per_kwh, True)
