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


# Forecast shapes: WattTime OpenAPI (/v3/forecast, horizon_hours), NESO Carbon Intensity
# API definition (/intensity/{from}/fw24h, /regional/intensity/{from}/fw24h/regionid/{id}),
# Carbon Aware SDK clients (EmissionsForecastDTO.forecastData of /emissions/forecasts/current).


async def test_watttime_forecast_asks_a_day_ahead_and_reaches_the_interface(fake_api: FakeApi) -> None:
    from carbon_fakes import WT_PASS, WT_TOKEN, WT_USER
    from carbon_recorded import wt_forecast, wt_login
    from proxy.carbon.providers import WattTimeProvider

    now = time.time()
    start = now - now % 300
    fake_api.script("/login", Reply(json=wt_login(WT_TOKEN)))
    fake_api.script("/v3/forecast", Reply(json=wt_forecast("CAISO_NORTH", [(start + 300 * i, 1000.0 - 10 * i) for i in range(12)])))
    provider = WattTimeProvider("CAISO_NORTH", Secret(WT_USER), Secret(WT_PASS), fallback=TableIntensity("USA"),
                                base_url=f"{fake_api.url}/v3", login_url=f"{fake_api.url}/login", forecast=True, **FAST)
    async with running(provider):
        assert fake_api.hits("/v3/forecast")[0].query["horizon_hours"] == "24"
        windows = forecast_of(provider, now, 3600.0)
    assert len(windows) == 12 and all(w.estimated for w in windows)
    assert windows[-1].g_per_kwh < windows[0].g_per_kwh


async def test_ukgrid_forecast_reads_fw24h(fake_api: FakeApi) -> None:
    from carbon_recorded import iso_minute_z, uk_national
    from proxy.carbon.providers import UkGridProvider

    now = time.time()
    half = now - now % 1800
    fake_api.script("/intensity", Reply(json=uk_national(half, 200, 190)))
    ahead = {"data": [uk_national(half + 1800 * i, 200 - 20 * i, None)["data"][0] for i in range(4)]}
    fake_api.script(f"/intensity/{iso_minute_z(half)}/fw24h", Reply(json=ahead))
    provider = UkGridProvider(fallback=TableIntensity("GBR"), base_url=fake_api.url, forecast=True, **FAST)
    async with running(provider):
        windows = forecast_of(provider, now, 3 * 1800.0)
    assert [w.g_per_kwh for w in windows] == [190, 180, 160, 140]  # the measured half hour, then forecasts
    assert [w.estimated for w in windows] == [False, True, True, True]


async def test_carbonaware_forecast_reads_forecast_data(fake_api: FakeApi) -> None:
    from carbon_recorded import ca_bylocation, iso_dotnet
    from proxy.carbon.providers import CarbonAwareSdkProvider

    now = time.time()
    fake_api.script("/emissions/bylocation", Reply(json=ca_bylocation("eastus", [(now - 60, 400.0)])))
    fake_api.script("/emissions/forecasts/current", Reply(json=[{
        "generatedAt": iso_dotnet(now - 30), "requestedAt": iso_dotnet(now), "location": "eastus", "windowSize": 5,
        "optimalDataPoints": [{"location": "eastus", "timestamp": iso_dotnet(now + 600), "duration": 5, "value": 250.0}],
        "forecastData": [{"location": "eastus", "timestamp": iso_dotnet(now + 300 * i), "duration": 5, "value": v}
                         for i, v in ((1, 350.0), (2, 250.0), (3, -1))],
    }]))
    provider = CarbonAwareSdkProvider("eastus", base_url=fake_api.url, fallback=TableIntensity("azure:eastus"), forecast=True, **FAST)
    async with running(provider):
        assert fake_api.hits("/emissions/forecasts/current")[0].query == {"location": "eastus"}
        windows = forecast_of(provider, now, 1200.0)
    assert [w.g_per_kwh for w in windows] == [400.0, 350.0, 250.0]  # the -1 point is no value


def test_forecast_is_a_setting_of_every_provider_that_publishes_one() -> None:
    from proxy.carbon.factory import build_intensity_provider

    env = {"ELECTRICITYMAPS_TOKEN": "t", "WATTTIME_USER": "u", "WATTTIME_PASSWORD": "p"}
    for table in ({"provider": "electricitymaps", "zone": "DE"}, {"provider": "watttime", "zone": "CAISO_NORTH"},
                  {"provider": "ukgrid", "region_id": 13}, {"provider": "carbonaware", "location": "eastus", "url": "http://127.0.0.1:1"}):
        assert build_intensity_provider({**table, "forecast": True}, environ=env).fetch_forecast is True
        assert build_intensity_provider(table, environ=env).fetch_forecast is False
