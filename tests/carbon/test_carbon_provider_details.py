"""Provider specifics: auth flows, units, regional endpoints, backoff, secrets, and no waiting."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from carbon_fakes import EM_TOKEN, FAST, WT_PASS, WT_TOKEN, WT_USER, FakeApi, FakeClock, Reply, running
from carbon_recorded import (
    ca_bylocation,
    em_forecast,
    em_latest,
    hour_start,
    uk_national,
    uk_regional,
    wt_forecast,
    wt_login,
)
from proxy.carbon.credentials import Secret
from proxy.carbon.providers import CarbonAwareSdkProvider, ElectricityMapsProvider, UkGridProvider, WattTimeProvider
from proxy.carbon.providers.parsing import parse_retry_after
from proxy.carbon.providers.ukgrid import outward_code
from proxy.carbon.table import TableIntensity


def _em(api: FakeApi, **kw: object) -> ElectricityMapsProvider:
    return ElectricityMapsProvider("DE", Secret(EM_TOKEN), fallback=TableIntensity("DEU"), base_url=f"{api.url}/v3", **{**FAST, **kw})


def _wt(api: FakeApi, **kw: object) -> WattTimeProvider:
    return WattTimeProvider(
        "CAISO_NORTH", Secret(WT_USER), Secret(WT_PASS), fallback=TableIntensity("USA"),
        base_url=f"{api.url}/v3", login_url=f"{api.url}/login", **{**FAST, **kw},
    )


async def test_electricitymaps_sends_auth_token_and_zone(fake_api: FakeApi) -> None:
    fake_api.script("/v3/carbon-intensity/latest", Reply(json=em_latest("DE", 300, hour_start(time.time()), estimated=True)))
    async with running(_em(fake_api)) as provider:
        seen = fake_api.hits("/v3/carbon-intensity/latest")[0]
        assert seen.headers["auth-token"] == EM_TOKEN
        # Never the caller's IP location in place of a zone without data (both names the docs have used).
        assert seen.query == {"zone": "DE", "disableCallerLookup": "true", "shouldUseFallbackCallerLookup": "false"}
        reading = provider.current()
        assert reading.estimated and "intensity_estimated=true" in reading.basis()


async def test_electricitymaps_forecast_covers_the_next_hours(fake_api: FakeApi) -> None:
    now = time.time()
    hour = hour_start(now)
    fake_api.script("/v3/carbon-intensity/latest", Reply(json=em_latest("DE", 300, hour)))
    fake_api.script("/v3/carbon-intensity/forecast", Reply(json=em_forecast("DE", [(hour, 999), (hour + 3600, 250), (hour + 7200, 200)])))
    async with running(_em(fake_api, forecast=True)) as provider:
        assert provider.current().g_per_kwh == 300  # the measured hour wins over its forecast
        later = provider.at(hour + 3600 + 60)
        assert (later.g_per_kwh, later.estimated, later.stale) == (250, True, False)


async def test_electricitymaps_rereads_a_rotated_token_file_on_401(fake_api: FakeApi, tmp_path: Path) -> None:
    token_file = tmp_path / "em.token"
    token_file.write_text("old-token\n")
    fake_api.script("/v3/carbon-intensity/latest", Reply(status=401), Reply(json=em_latest("DE", 280, hour_start(time.time()))))
    token_file.write_text("new-token\n")  # rotated after the provider loaded the old one
    provider = ElectricityMapsProvider(
        "DE", Secret("old-token", path=str(token_file)), fallback=TableIntensity("DEU"), base_url=f"{fake_api.url}/v3", **FAST
    )
    async with running(provider):
        assert provider.current().g_per_kwh == 280
        assert [s.headers["auth-token"] for s in fake_api.hits("/v3/carbon-intensity/latest")][:2] == ["old-token", "new-token"]


async def test_watttime_logs_in_with_basic_auth_and_converts_lbs_per_mwh(fake_api: FakeApi) -> None:
    fake_api.script("/login", Reply(json=wt_login(WT_TOKEN)))
    # horizon_hours=0 answers one point (the newest forecast's first), per WattTime's OpenAPI spec.
    fake_api.script("/v3/forecast", Reply(json=wt_forecast("CAISO_NORTH", [(time.time() - 10, 900.0)])))
    async with running(_wt(fake_api)) as provider:
        login = fake_api.hits("/login")[0]
        assert login.headers["Authorization"] == "Basic " + base64.b64encode(f"{WT_USER}:{WT_PASS}".encode()).decode()
        data = fake_api.hits("/v3/forecast")[0]
        assert data.headers["Authorization"] == f"Bearer {WT_TOKEN}"
        assert data.query == {"region": "CAISO_NORTH", "signal_type": "co2_moer", "horizon_hours": "0"}
        reading = provider.current()
        assert reading.g_per_kwh == pytest.approx(900.0 * 0.45359237)
        assert reading.marginal and reading.estimated and "marginal=true" in reading.basis()
        assert "intensity_estimated=true" in reading.basis()  # a forecast value, not a measurement


async def test_watttime_refreshes_its_token_and_relogs_in_on_401(fake_api: FakeApi) -> None:
    clock = FakeClock()
    fake_api.script("/login", Reply(json=wt_login("t1")), Reply(json=wt_login("t2")), Reply(json=wt_login("t3")))
    body = wt_forecast("CAISO_NORTH", [(clock.now - 10, 800.0)])
    fake_api.script("/v3/forecast", Reply(json=body), Reply(json=body), Reply(status=401), Reply(json=body))
    async with running(_wt(fake_api, poll_seconds=30.0, clock=clock)) as provider:
        assert provider.logins == 1
        clock.advance(26 * 60)  # tokens live 30 minutes; renew before
        await provider.poll_once()
        assert provider.logins == 2 and fake_api.hits("/v3/forecast")[-1].headers["Authorization"] == "Bearer t2"
        await provider.poll_once()  # data answers 401: log in again once and retry
        assert provider.logins == 3 and fake_api.hits("/v3/forecast")[-1].headers["Authorization"] == "Bearer t3"
        assert provider.status().healthy


async def test_watttime_rejects_percentile_units(fake_api: FakeApi) -> None:
    fake_api.script("/login", Reply(json=wt_login(WT_TOKEN)))
    fake_api.script("/v3/forecast", Reply(json=wt_forecast("CAISO_NORTH", [(time.time(), 55.0)], units="percentile")))
    async with running(_wt(fake_api)) as provider:
        assert provider.current().source == "table:USA"
        assert "unknown units" in (provider.status().last_error or "")


async def test_ukgrid_national_uses_the_forecast_when_actual_is_missing(fake_api: FakeApi) -> None:
    now = time.time()
    fake_api.script("/intensity", Reply(json=uk_national(now - now % 1800, 210, None)))
    async with running(UkGridProvider(fallback=TableIntensity("GBR"), base_url=fake_api.url, **FAST)) as provider:
        reading = provider.current()
        assert (reading.g_per_kwh, reading.estimated, reading.source) == (210, True, "ukgrid:national")


@pytest.mark.parametrize(
    ("kwargs", "path", "label"),
    [({"region_id": 13}, "/regional/regionid/13", "ukgrid:region13"),
     ({"postcode": "rg10 9ab"}, "/regional/postcode/RG10", "ukgrid:postcode-RG10")],
)
async def test_ukgrid_regional_by_id_or_postcode(fake_api: FakeApi, kwargs: dict, path: str, label: str) -> None:
    now = time.time()
    fake_api.script(path, Reply(json=uk_regional(13, now - now % 1800, 150, postcode=kwargs.get("postcode"))))
    async with running(UkGridProvider(fallback=TableIntensity("GBR"), base_url=fake_api.url, **kwargs, **FAST)) as provider:
        reading = provider.current()
        assert (reading.g_per_kwh, reading.estimated, reading.source) == (150, True, label)


def test_outward_code() -> None:
    assert [outward_code(p) for p in ("RG10 9AB", "rg109ab", "SW1A", "E1", "not a postcode", "")] == ["RG10", "RG10", "SW1A", "E1", None, None]


async def test_carbonaware_asks_for_the_last_hour_and_can_be_marginal(fake_api: FakeApi) -> None:
    clock = FakeClock()
    fake_api.script("/emissions/bylocation", Reply(json=ca_bylocation("eastus", [(clock.now - 60, 410.0)])))
    provider = CarbonAwareSdkProvider(
        "eastus", base_url=fake_api.url, fallback=TableIntensity("azure:eastus"), marginal=True, clock=clock, **FAST
    )
    async with running(provider):
        query = fake_api.hits("/emissions/bylocation")[0].query
        assert query["location"] == "eastus" and query["time"] < query["toTime"]
        reading = provider.current()
        assert (reading.g_per_kwh, reading.marginal) == (410.0, True)


async def test_429_backs_off_exponentially_without_retry_after(fake_api: FakeApi) -> None:
    fake_api.script("/v3/carbon-intensity/latest", Reply(status=429))
    async with running(_em(fake_api, poll_seconds=10.0, max_backoff_seconds=60.0)) as provider:
        delays = [provider.last_delay_seconds]
        for _ in range(3):
            delays.append(await provider.poll_once())
        assert delays == [20.0, 40.0, 60.0, 60.0]


async def test_429_retries_after_retry_after_and_recovers(fake_api: FakeApi) -> None:
    fake_api.script(
        "/v3/carbon-intensity/latest",
        Reply(status=429, headers={"Retry-After": "1"}),
        Reply(json=em_latest("DE", 333, hour_start(time.time()))),
    )
    async with running(_em(fake_api)) as provider:
        for _ in range(100):
            if provider.current().g_per_kwh == 333:
                break
            await asyncio.sleep(0.05)
        first, second = fake_api.hits("/v3/carbon-intensity/latest")[:2]
        assert second.unix - first.unix >= 0.95
        assert provider.current().stale is False


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("120", 0.0) == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0 - 30) == pytest.approx(30.0)
    assert parse_retry_after("soon", 0.0) is None and parse_retry_after(None, 0.0) is None


async def test_secrets_never_reach_logs_reprs_or_the_basis(
    fake_api: FakeApi, refused_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    now = time.time()
    fake_api.script("/login", Reply(json=wt_login(WT_TOKEN)), Reply(status=401))
    fake_api.script(
        "/v3/carbon-intensity/latest",
        Reply(json=em_latest("DE", 300, hour_start(now))),
        Reply(json={"carbonIntensity": 300, "datetime": EM_TOKEN}),  # a body that echoes the key
        Reply(status=401), Reply(status=500), Reply(text="{not json"),
    )
    fake_api.script("/v3/forecast", Reply(json={"data": [{"point_time": WT_TOKEN, "value": 1}]}), Reply(status=401))
    em, wt = _em(fake_api, poll_seconds=60.0), _wt(fake_api, poll_seconds=60.0)
    outage = ElectricityMapsProvider("DE", Secret(EM_TOKEN), fallback=TableIntensity("DEU"), base_url=refused_url, **FAST)
    async with running(em), running(wt), running(outage):
        for _ in range(4):
            await em.poll_once()
        await wt.poll_once()
        assert fake_api.hits("/v3/carbon-intensity/latest")[0].headers["auth-token"] == EM_TOKEN  # it was used
        texts = [caplog.text]
        for provider in (em, wt, outage):
            texts += [repr(provider), str(provider.status()), provider.current().basis(), repr(provider.__dict__)]
    joined = "\n".join(texts)
    assert "malformed" in joined and "401" in joined  # the failures were logged
    for secret in (EM_TOKEN, WT_USER, WT_PASS, WT_TOKEN):
        assert secret not in joined


async def test_no_request_waits_on_a_hanging_provider(fake_api: FakeApi) -> None:
    fake_api.script("/v3/carbon-intensity/latest", Reply(hang=True))
    provider = _em(fake_api, timeout_seconds=30.0, startup_wait_seconds=0.1)

    async def handler(request: web.Request) -> web.Response:
        reading = provider.current()  # what the proxy does for each request
        return web.Response(text=reading.basis())

    app = web.Application()
    app.router.add_get("/", handler)
    async with running(provider), TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert len(fake_api.hits("/v3/carbon-intensity/latest")) == 1  # the poll is in flight, hanging
        worst = 0.0
        for _ in range(1000):
            started = time.perf_counter()
            provider.current()
            worst = max(worst, time.perf_counter() - started)
        assert worst < 0.005
        started = time.perf_counter()
        resp = await client.get("/")
        assert resp.status == 200 and await resp.text() == "intensity=table:DEU; stale=true"
        assert time.perf_counter() - started < 0.5
        assert provider.status().last_attempt_unix is not None and provider.status().consecutive_failures == 0


async def test_close_stops_polling_and_closes_its_session(fake_api: FakeApi) -> None:
    fake_api.script("/v3/carbon-intensity/latest", Reply(json=em_latest("DE", 300, hour_start(time.time()))))
    provider = _em(fake_api)
    await provider.start()
    await provider.close()
    count = len(fake_api.seen)
    await asyncio.sleep(0.2)
    assert len(fake_api.seen) == count
    assert provider.current().g_per_kwh == 300  # the cache still answers


async def test_a_shared_session_is_not_closed(fake_api: FakeApi) -> None:
    fake_api.script("/v3/carbon-intensity/latest", Reply(json=em_latest("DE", 300, hour_start(time.time()))))
    async with aiohttp.ClientSession() as session:
        async with running(_em(fake_api, session=session)) as provider:
            assert provider.current().g_per_kwh == 300
        assert not session.closed
