"""Issue 20: each provider held to its official contract, against a local server replaying it.

Where each shape comes from:
- Electricity Maps v3: docs.electricitymaps.com, `GET /v3/carbon-intensity/latest` (host
  api.electricitymaps.com; the body echoes `zone`; `disableCallerLookup` turns off the
  caller-IP fallback for zones without data).
- WattTime v3: the OpenAPI spec at docs.watttime.org/openapi.json (`/v3/forecast` with
  `horizon_hours=0` answers the newest forecast's first point; 401 = bad/expired token,
  403 = region or signal outside the account's plan).
- Carbon Aware SDK WebAPI: the generated client docs of the SDK
  (src/clients/python/docs/CarbonAwareApi.md: 200 or 204 "Success" for the emissions
  queries); `rating = -1` is what its EmissionsData holds for a missing value.
- UK Carbon Intensity (NESO) API definition: regions 1..17, all in Great Britain; a
  Northern Ireland (BT) postcode is outside its coverage.
"""

from __future__ import annotations

import logging
import time

import pytest

from carbon_fakes import EM_TOKEN, FAST, WT_PASS, WT_TOKEN, WT_USER, FakeApi, Reply, running
from carbon_recorded import ca_bylocation, em_latest, hour_start, wt_forecast, wt_login
from proxy.carbon.credentials import Secret
from proxy.carbon.factory import build_intensity_provider
from proxy.carbon.providers import CarbonAwareSdkProvider, ElectricityMapsProvider, UkGridProvider, WattTimeProvider
from proxy.carbon.table import TableIntensity
from proxy.errors import ConfigError


def _em(api: FakeApi, **kw: object) -> ElectricityMapsProvider:
    return ElectricityMapsProvider("DE", Secret(EM_TOKEN), fallback=TableIntensity("DEU"), base_url=f"{api.url}/v3", **{**FAST, **kw})


async def test_electricitymaps_refuses_an_answer_for_another_zone(fake_api: FakeApi, caplog: pytest.LogCaptureFixture) -> None:
    # The API's caller-lookup fallback: asked for DE, it answers for where the caller's IP is.
    fake_api.script("/v3/carbon-intensity/latest", Reply(json=em_latest("FR", 40, hour_start(time.time()))))
    caplog.set_level(logging.DEBUG, logger="proxy.carbon.intensity")
    async with running(_em(fake_api, poll_seconds=30.0)) as provider:
        await provider.poll_once()
        reading = provider.current()
        assert (reading.source, reading.stale) == ("table:DEU", True)  # never FR's 40 labelled DE
        assert "'FR'" in (provider.status().last_error or "") and "'DE'" in (provider.status().last_error or "")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "zone" in r.getMessage()]
    assert len(warnings) == 1  # said once, not on every poll


async def test_electricitymaps_uses_the_current_host_and_a_redirect_is_a_config_error(fake_api: FakeApi) -> None:
    assert ElectricityMapsProvider.DEFAULT_URL == "https://api.electricitymaps.com/v3"
    fake_api.script("/v3/carbon-intensity/latest",
                    Reply(status=301, headers={"Location": "https://api.electricitymaps.com/v3/carbon-intensity/latest?zone=DE"}))
    async with running(_em(fake_api, poll_seconds=10.0)) as provider:
        error = provider.status().last_error or ""
        assert "301" in error and "carbon.url" in error and "https://api.electricitymaps.com" in error
        assert provider.current().source == "table:DEU"
        assert provider.last_delay_seconds is not None and provider.last_delay_seconds > 10.0  # backs off
        assert len(fake_api.hits("/v3/carbon-intensity/latest")) == 1  # never followed


def _wt(api: FakeApi, **kw: object) -> WattTimeProvider:
    return WattTimeProvider(
        "PJM_DC", Secret(WT_USER), Secret(WT_PASS), fallback=TableIntensity("USA"),
        base_url=f"{api.url}/v3", login_url=f"{api.url}/login", **{**FAST, **kw},
    )


async def test_watttime_403_is_a_plan_limit_not_a_bad_login(fake_api: FakeApi) -> None:
    fake_api.script("/login", Reply(json=wt_login(WT_TOKEN)))
    fake_api.script("/v3/forecast", Reply(status=403, json={"error": "Unauthorized region", "message": "upgrade your plan"}))
    async with running(_wt(fake_api, poll_seconds=10.0)) as provider:
        first_delay = provider.last_delay_seconds
        await provider.poll_once()
        assert provider.logins == 1  # the token is fine: no login on every poll
        error = provider.status().last_error or ""
        assert "403" in error and "PJM_DC" in error and "plan" in error and "password" not in error
        assert first_delay is not None and first_delay > 10.0 and provider.last_delay_seconds > first_delay  # backs off
        assert provider.current().source == "table:USA"


async def test_watttime_horizon_zero_is_a_forecast_value(fake_api: FakeApi) -> None:
    fake_api.script("/login", Reply(json=wt_login(WT_TOKEN)))
    now = time.time()
    fake_api.script("/v3/forecast", Reply(json=wt_forecast("PJM_DC", [(now - now % 300, 1000.0)])))
    async with running(_wt(fake_api)) as provider:
        reading = provider.current()
        assert reading.estimated and "intensity_estimated=true" in reading.basis()


def _ca(api: FakeApi, **kw: object) -> CarbonAwareSdkProvider:
    return CarbonAwareSdkProvider("eastus", base_url=api.url, fallback=TableIntensity("azure:eastus"), **{**FAST, **kw})


async def test_carbonaware_204_is_no_data_not_a_malformed_answer(fake_api: FakeApi) -> None:
    fake_api.script("/emissions/bylocation", Reply(status=204, text=""))
    async with running(_ca(fake_api, poll_seconds=10.0)) as provider:
        error = provider.status().last_error or ""
        assert "no data" in error and "malformed" not in error
        assert provider.last_delay_seconds == pytest.approx(10.0)  # the normal pace, no failure back-off
        reading = provider.current()
        assert (reading.source, reading.stale) == ("table:azure:eastus", True)


async def test_carbonaware_skips_rating_minus_one(fake_api: FakeApi) -> None:
    now = time.time()
    fake_api.script("/emissions/bylocation", Reply(json=ca_bylocation("eastus", [(now - 600, 300.0), (now - 300, -1)])))
    async with running(_ca(fake_api)) as provider:
        assert provider.status().healthy
        assert provider.current().g_per_kwh == 300.0


@pytest.mark.parametrize("postcode", ["BT1 1AA", "bt48", "BT487AB"])
def test_ukgrid_refuses_northern_ireland_at_config_time(postcode: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_intensity_provider({"provider": "ukgrid", "postcode": postcode})
    assert caught.value.key == "carbon.postcode" and "Northern Ireland" in str(caught.value)
    with pytest.raises(ValueError, match="Northern Ireland"):
        UkGridProvider(fallback=TableIntensity("GBR"), postcode=postcode)
