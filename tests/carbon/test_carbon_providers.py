"""Each live provider against a local fake API: success, outage, slow, 401, 429, malformed, stale."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from carbon_fakes import EM_TOKEN, FAST, WT_PASS, WT_TOKEN, WT_USER, FakeApi, FakeClock, Reply, running
from carbon_recorded import ca_bylocation, em_latest, hour_start, uk_national, wt_forecast, wt_login
from proxy.carbon.credentials import Secret
from proxy.carbon.providers import (
    CarbonAwareSdkProvider,
    ElectricityMapsProvider,
    PollingProvider,
    UkGridProvider,
    WattTimeProvider,
)
from proxy.carbon.table import TableIntensity

TWO_DAYS = 2 * 86400.0


@dataclass
class Case:
    name: str
    data_path: str
    build: Callable[[str, dict[str, Any]], PollingProvider]
    body: Callable[[float], Any]
    """A good answer whose newest point is current at `now`."""
    old_body: Callable[[float], Any]
    """A good answer whose newest point is two days old."""
    expected_g: float
    source: str
    fallback_source: str
    marginal: bool = False
    estimated: bool = False
    login_path: str | None = None


def _em(url: str, kw: dict[str, Any]) -> PollingProvider:
    return ElectricityMapsProvider("DE", Secret(EM_TOKEN), fallback=TableIntensity("DEU"), base_url=f"{url}/v3", **kw)


def _wt(url: str, kw: dict[str, Any]) -> PollingProvider:
    return WattTimeProvider(
        "CAISO_NORTH", Secret(WT_USER), Secret(WT_PASS), fallback=TableIntensity("USA"),
        base_url=f"{url}/v3", login_url=f"{url}/login", **kw,
    )


def _uk(url: str, kw: dict[str, Any]) -> PollingProvider:
    return UkGridProvider(fallback=TableIntensity("GBR"), base_url=url, **kw)


def _ca(url: str, kw: dict[str, Any]) -> PollingProvider:
    return CarbonAwareSdkProvider("eastus", base_url=url, fallback=TableIntensity("azure:eastus"), **kw)


CASES = [
    Case("electricitymaps", "/v3/carbon-intensity/latest", _em,
         lambda now: em_latest("DE", 321, hour_start(now)), lambda now: em_latest("DE", 321, hour_start(now - TWO_DAYS)),
         321.0, "electricitymaps:DE", "table:DEU"),
    Case("watttime", "/v3/forecast", _wt,
         lambda now: wt_forecast("CAISO_NORTH", [(now - now % 300, 1000.0)]),
         lambda now: wt_forecast("CAISO_NORTH", [(now - TWO_DAYS, 1000.0)]),
         453.59237, "watttime:CAISO_NORTH", "table:USA", marginal=True, estimated=True, login_path="/login"),
    Case("ukgrid", "/intensity", _uk,
         lambda now: uk_national(now - now % 1800, 200, 190), lambda now: uk_national(now - TWO_DAYS, 200, 190),
         190.0, "ukgrid:national", "table:GBR"),
    Case("carbonaware", "/emissions/bylocation", _ca,
         lambda now: ca_bylocation("eastus", [(now - 600, 300.0), (now - 300, 350.0)]),
         lambda now: ca_bylocation("eastus", [(now - TWO_DAYS, 350.0)]),
         350.0, "carbonaware:eastus", "table:azure:eastus"),
]


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def _script(api: FakeApi, case: Case, *replies: Reply) -> None:
    if case.login_path:
        api.script(case.login_path, Reply(json=wt_login(WT_TOKEN)))
    api.script(case.data_path, *replies)


async def test_success_reads_the_value_and_labels_it(fake_api: FakeApi, case: Case) -> None:
    _script(fake_api, case, Reply(json=case.body(time.time())))
    async with running(case.build(fake_api.url, FAST)) as provider:
        reading = provider.current()
        assert reading.g_per_kwh == pytest.approx(case.expected_g)
        assert reading.source == case.source
        assert (reading.stale, reading.marginal, reading.estimated) == (False, case.marginal, case.estimated)
        assert reading.basis().startswith(f"intensity={case.source}")
        assert provider.status().healthy


async def test_outage_falls_back_to_the_table_flagged_stale(refused_url: str, case: Case) -> None:
    async with running(case.build(refused_url, FAST)) as provider:
        reading = provider.current()
        assert reading.source == case.fallback_source
        assert reading.stale and "stale=true" in reading.basis()
        assert "cannot connect" in (provider.status().last_error or "")


async def test_slow_source_times_out_and_never_slows_current(fake_api: FakeApi, case: Case) -> None:
    _script(fake_api, case, Reply(json=case.body(time.time()), delay_seconds=3.0))
    started = time.perf_counter()
    async with running(case.build(fake_api.url, FAST)) as provider:
        assert time.perf_counter() - started < 1.5  # one 0.3 s timeout, not the 3 s answer
        reading = provider.current()
        assert (reading.source, reading.stale) == (case.fallback_source, True)
        assert "no answer within 0.3s" in (provider.status().last_error or "")


async def test_401_is_reported_and_falls_back(fake_api: FakeApi, case: Case) -> None:
    if case.login_path:
        fake_api.script(case.login_path, Reply(status=401, json={"error": "invalid credentials"}))
    fake_api.script(case.data_path, Reply(status=401, json={"error": "unauthorized"}))
    async with running(case.build(fake_api.url, FAST)) as provider:
        reading = provider.current()
        assert (reading.source, reading.stale) == (case.fallback_source, True)
        assert "401" in (provider.status().last_error or "") and "refused" in (provider.status().last_error or "")
        # Auth failures wait a full poll interval rather than hammering the API.
        assert provider.last_delay_seconds == pytest.approx(FAST["poll_seconds"])


async def test_429_honours_retry_after(fake_api: FakeApi, case: Case) -> None:
    _script(fake_api, case, Reply(status=429, headers={"Retry-After": "1"}, json={"message": "slow down"}),
            Reply(json=case.body(time.time())))
    async with running(case.build(fake_api.url, FAST)) as provider:
        assert provider.last_delay_seconds == pytest.approx(1.0)
        assert provider.current().stale
        await asyncio.sleep(0.3)
        assert len(fake_api.hits(case.data_path)) == 1  # no retry before Retry-After


@pytest.mark.parametrize("reply", [Reply(text="<html>502 Bad Gateway</html>"), Reply(json={"unexpected": True})],
                         ids=["not-json", "wrong-shape"])
async def test_malformed_answer_falls_back(fake_api: FakeApi, case: Case, reply: Reply) -> None:
    _script(fake_api, case, reply)
    async with running(case.build(fake_api.url, FAST)) as provider:
        reading = provider.current()
        assert (reading.source, reading.stale) == (case.fallback_source, True)
        assert (provider.status().last_error or "").startswith("malformed response")


async def test_stale_data_falls_back_to_the_table(fake_api: FakeApi, case: Case) -> None:
    _script(fake_api, case, Reply(json=case.old_body(time.time())))
    async with running(case.build(fake_api.url, {**FAST, "stale_after_seconds": 3 * 3600})) as provider:
        reading = provider.current()
        assert (reading.source, reading.stale) == (case.fallback_source, True)


async def test_outage_keeps_last_good_value_then_the_table(fake_api: FakeApi, case: Case) -> None:
    clock = FakeClock()
    _script(fake_api, case, Reply(json=case.body(clock.now)), Reply(status=503, json={"error": "down"}))
    kw = {**FAST, "stale_after_seconds": 3 * 3600, "clock": clock}
    async with running(case.build(fake_api.url, kw)) as provider:
        first = provider.current()
        assert (first.source, first.stale) == (case.source, False)
        for _ in range(100):  # wait for the next (failing) poll
            if provider.status().consecutive_failures:
                break
            await asyncio.sleep(0.02)
        during = provider.current()
        assert (during.source, during.g_per_kwh, during.stale) == (case.source, first.g_per_kwh, True)
        assert provider.at(clock.now - 1).stale is False  # the past value was live then
        clock.advance(4 * 3600)
        after = provider.current()
        assert (after.source, after.stale) == (case.fallback_source, True)
