"""CO2e budgets: config validation, charging (provisional, then the final difference),
periods, reject and flag modes through a running proxy, and state across a restart."""

from __future__ import annotations

import calendar
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import FakeMeter, proxy_config, start_upstream
from receipts_fakes import finalize, make_receipt

from proxy.budgets import Budgets, parse_budgets, period_end_unix
from proxy.carbon.intensity import ConstantIntensity
from proxy.config import config_from_dict
from proxy.errors import ConfigError
from proxy.receipts.sqlite import SqliteReceiptStore
from proxy.serve import Service
from proxy.tenants import Tenancy

NOON = calendar.timegm((2024, 5, 15, 12, 0, 0))


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"budget_mode": "block"}, "tenants.budget_mode"),
        ({"budgets": {"team-a": 5}}, "tenants.budgets.team-a"),
        ({"budgets": {"team-a": {"grams": -1}}}, "tenants.budgets.team-a.grams"),
        ({"budgets": {"team-a": {"grams": "lots"}}}, "tenants.budgets.team-a.grams"),
        ({"budgets": {"team-a": {"grams": 5, "period": "week"}}}, "tenants.budgets.team-a.period"),
        ({"budgets": {"team-a": {"grams": 5, "limit": 3}}}, "tenants.budgets.team-a.limit"),
    ],
)
def test_invalid_budget_config_names_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        Tenancy(table)  # check-config validates through Tenancy
    assert error.value.key == key


def test_budget_config_with_a_default_for_every_other_tenant() -> None:
    config = parse_budgets({"budget_mode": "flag", "budgets": {"team-a": {"grams": 500}, "*": {"grams": 5, "period": "month"}}})
    assert config.mode == "flag"
    assert config.for_tenant("team-a").grams == 500 and config.for_tenant("team-a").period == "day"  # type: ignore[union-attr]
    assert config.for_tenant("key:abc").period == "month"  # type: ignore[union-attr]


async def test_charges_provisional_then_only_the_final_difference() -> None:
    budgets = Budgets(parse_budgets({"budgets": {"team-a": {"grams": 1.0}}}), clock=lambda: NOON)
    first = await budgets.admit("team-a", "r1", "m", 10, 10)
    assert first.allowed and first.remaining_grams == 1.0 and first.reserved_grams > 0
    receipt = make_receipt("r1", started_unix=NOON, co2e_grams=0.4)
    budgets.charge(receipt)  # the provisional figure replaces the reservation
    assert budgets.used_grams("team-a") == pytest.approx(0.4)
    assert budgets.remaining_grams() == {"team-a": pytest.approx(0.6)}
    budgets.charge(finalize(receipt, 0.5))
    assert budgets.used_grams("team-a") == pytest.approx(0.5)
    budgets.charge(make_receipt("r2", started_unix=NOON, co2e_grams=0.5, status="final"))
    refused = await budgets.admit("team-a", "r3", "m", 10, 10)
    assert not refused.allowed and refused.remaining_grams == pytest.approx(0.0)
    assert budgets.rejected_total == {"team-a": 1}
    assert (await budgets.admit("team-b", "r4", "m", 10, 10)).remaining_grams is None  # no budget, no header


async def test_a_new_day_starts_from_zero_and_retry_after_points_at_it() -> None:
    now = [NOON]
    budgets = Budgets(parse_budgets({"budgets": {"team-a": {"grams": 1.0}}}), clock=lambda: now[0])
    await budgets.admit("team-a", "r0", None, 1, 1)  # first sight: the tenant is held from here on
    budgets.release("r0")
    budgets.charge(make_receipt("r1", started_unix=NOON, co2e_grams=2.0, status="final"))
    assert (await budgets.admit("team-a", "r2", None, 1, 1)).allowed is False
    assert budgets.retry_after_seconds("team-a") == 12 * 3600
    now[0] = NOON + 86_400
    admitted = await budgets.admit("team-a", "r3", None, 1, 1)
    assert admitted.allowed and admitted.remaining_grams == 1.0


def test_month_periods_end_at_the_calendar_month() -> None:
    assert period_end_unix("month", calendar.timegm((2024, 12, 31, 23, 0, 0))) == calendar.timegm((2025, 1, 1, 0, 0, 0))
    assert period_end_unix("day", NOON) == calendar.timegm((2024, 5, 16, 0, 0, 0))


# -- through a running proxy ---------------------------------------------------------------


async def completion(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"id": "x", "object": "chat.completion", "usage": {"prompt_tokens": 5, "completion_tokens": 50}})


async def start(upstream_url: str, db: Path, tenants: dict[str, Any]) -> tuple[Service, SqliteReceiptStore]:
    store = SqliteReceiptStore(str(db))
    config = proxy_config(upstream_url, tenants={"header": "X-Tenant-Id", **tenants}, receipts={"path": str(db)})
    service = Service(config_from_dict(config), meter=FakeMeter(), intensity=ConstantIntensity(450), receipts=store)
    await service.start()
    return service, store


async def call(service: Service, tenant: str) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{service.public_port}/v1/chat/completions",
            json={"model": "m", "messages": []},
            headers={"X-Tenant-Id": tenant},
        ) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.json()


TINY = {"grams": 1e-9, "period": "day"}  # any request uses it up (embodied carbon alone)


@pytest.fixture
async def upstream() -> Any:
    runner, url = await start_upstream({"/v1/chat/completions": completion})
    yield url
    await runner.cleanup()


async def test_reject_mode_answers_429_once_the_budget_is_used(upstream: str, tmp_path: Path) -> None:
    service, _ = await start(upstream, tmp_path / "r.db", {"budgets": {"team-a": TINY, "team-b": {"grams": 1e6}}})
    try:
        status, headers, _ = await call(service, "team-a")
        assert status == 200 and float(headers["x-co2e-budget-remaining"]) == pytest.approx(1e-9)
        status, headers, body = await call(service, "team-a")
        assert status == 429
        assert body["error"]["type"] == "carbon_budget_exceeded"
        assert float(headers["x-co2e-budget-remaining"]) < 0
        assert int(headers["retry-after"]) > 0 and headers["x-request-id"]
        status, headers, _ = await call(service, "team-b")  # another tenant is not affected
        assert status == 200 and headers["x-co2e-budget-remaining"] == "1000000"
        status, headers, _ = await call(service, "team-c")  # no budget: no header
        assert status == 200 and "x-co2e-budget-remaining" not in headers
    finally:
        await service.stop()


async def test_flag_mode_serves_and_shows_the_overspend(upstream: str, tmp_path: Path) -> None:
    service, _ = await start(upstream, tmp_path / "r.db", {"budget_mode": "flag", "budgets": {"team-a": TINY}})
    try:
        await call(service, "team-a")
        status, headers, _ = await call(service, "team-a")
        assert status == 200 and float(headers["x-co2e-budget-remaining"]) < 0
        assert service.proxy.budgets.flagged_total == {"other": 1}  # by metric label: team-a is not allow-listed
    finally:
        await service.stop()


async def test_budget_state_survives_a_restart(upstream: str, tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    tenants = {"budgets": {"team-a": {"grams": 1e-3, "period": "month"}}}
    service, _ = await start(upstream, db, tenants)
    try:
        for _ in range(3):
            await call(service, "team-a")
        used = service.proxy.budgets.used_grams("team-a")
        assert used is not None and used > 0
    finally:
        await service.stop()
    used_after_settling = service.proxy.budgets.used_grams("team-a")
    assert used_after_settling is not None

    service, _ = await start(upstream, db, tenants)
    try:
        assert service.proxy.budgets.used_grams("team-a") is None  # nothing read at start: lazily, on first sight
        _, headers, _ = await call(service, "team-a")
        assert float(headers["x-co2e-budget-remaining"]) == pytest.approx(1e-3 - used_after_settling, rel=1e-4)
    finally:
        await service.stop()

    # Used up before the restart -> rejected straight after it.
    tenants = {"budgets": {"team-a": TINY}}
    service, _ = await start(upstream, db, tenants)
    try:
        assert (await call(service, "team-a"))[0] == 429
    finally:
        await service.stop()
