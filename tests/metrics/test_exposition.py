"""The admin listener's /metrics of a live proxy: clean, complete, documented, bounded."""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from typing import AsyncIterator

import aiohttp
import pytest

from helpers import FakeMeter
from proxy.metrics import MODEL_CAP
from proxy.serve import Service
from proxy.tenants import OTHER

from .tools import ALLOWED_TENANTS, ROOT, TENANT_HEADER, chat_body, fast_upstream, parse_samples, require_binary, run_tool, scrape, send_chat, start_service, stop_service

DOCS = ROOT / "README.md"


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    runner, url = await fast_upstream()
    # A budget for one allow-listed tenant, so the budget gauge is exported (and documented).
    tenants = {"header": TENANT_HEADER, "allow": list(ALLOWED_TENANTS), "budgets": {"team-a": {"grams": 1e6}}}
    svc = await start_service(url, FakeMeter(watts=300.0), tenants=tenants)
    try:
        yield svc
    finally:
        await stop_service(svc)
        await runner.cleanup()


async def _send(service: Service, count: int, tenant_of=lambda i: "team-a", model_of=lambda i: "m", concurrency: int = 32) -> None:
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            async with limit:
                assert await send_chat(session, service.public_port, tenant_of(i), chat_body(model_of(i))) == 200

        # A bound on the whole batch, so a stuck proxy fails the test instead of hanging it.
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), timeout=120)


async def _settled(service: Service, requests: int, timeout: float = 10.0) -> str:
    """Scrape once every request's figure is final (counted in the energy histogram)."""
    deadline = time.monotonic() + timeout
    while True:
        text = await scrape(service.admin_port)
        finals = sum(v for name, _, v in parse_samples(text) if name == "carbon_proxy_per_request_energy_joules_count")
        if finals >= requests or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.05)


def families(text: str) -> dict[str, set[str]]:
    """carbon_proxy_* metric family -> label names (histograms by their base name)."""
    found: dict[str, set[str]] = defaultdict(set)
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    for name, labels, _ in parse_samples(text):
        if not name.startswith("carbon_proxy_"):
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if types.get(base) == "histogram":
            name = base
            labels = {k: v for k, v in labels.items() if k != "le"}
        found[name] |= set(labels)
    return found


async def test_live_scrape_is_clean_under_promtool(service: Service) -> None:
    promtool = require_binary("promtool")
    await _send(service, 20, tenant_of=lambda i: ("team-a", "team-b", "someone")[i % 3])
    text = await _settled(service, 20)
    result = run_tool(promtool, "check", "metrics", stdin=text)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stdout + result.stderr


async def test_every_required_metric_is_exported_in_base_units(service: Service) -> None:
    await _send(service, 10)
    found = families(await _settled(service, 10))
    request = {"upstream", "model", "tenant"}
    expected = {
        "carbon_proxy_requests_total": request | {"outcome"},
        "carbon_proxy_tokens_total": request | {"type"},
        "carbon_proxy_request_energy_joules_total": request,
        "carbon_proxy_request_co2e_grams_total": request,
        "carbon_proxy_per_request_energy_joules": request,
        "carbon_proxy_per_request_co2e_grams": request,
        "carbon_proxy_device_energy_joules_total": {"device"},
        "carbon_proxy_device_power_watts": {"device"},
        "carbon_proxy_measured_energy_joules_total": {"group"},
        "carbon_proxy_attributed_energy_joules_total": {"group"},
        "carbon_proxy_idle_energy_joules_total": {"group"},
        "carbon_proxy_grid_intensity_grams_per_joule": {"source"},
        "carbon_proxy_meter_up": {"meter", "method"},
        "carbon_proxy_meter_staleness_seconds": {"meter"},
        "carbon_proxy_intensity_provider_up": {"provider"},
        "carbon_proxy_intensity_provider_staleness_seconds": {"provider"},
        "carbon_proxy_overhead_seconds": {"upstream"},
        "carbon_proxy_time_to_first_byte_seconds": {"upstream", "model"},
    }
    for name, labels in expected.items():
        assert found.get(name) == labels, f"{name}: {found.get(name)}"
    units = ("_total", "_joules", "_grams", "_seconds", "_watts", "_ratio", "_up", "_stale", "_requests", "_failures", "_connections", "_grams_per_joule")
    for name in found:
        assert name.endswith(units), f"{name} names no unit"


async def test_every_exported_metric_is_documented_with_its_labels(service: Service) -> None:
    await _send(service, 5)
    found = families(await _settled(service, 5))
    documented: dict[str, set[str]] = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("carbon_proxy_"):
            documented[cells[0]] = {label.strip().strip("`") for label in cells[3].split(",") if label.strip() not in ("", "-")}
    assert set(found) == set(documented), f"undocumented: {set(found) - set(documented)}; gone: {set(documented) - set(found)}"
    for name, labels in found.items():
        assert documented[name] == labels, f"{name}: docs say {documented[name]}, exported {labels}"


async def test_ten_thousand_tenant_ids_keep_series_bounded(service: Service) -> None:
    """10,000 distinct tenants and 200 distinct model names over HTTP: tenant label values
    stay within the allow-list plus `other`, models within the cap plus `other`."""
    n = 10_000
    await _send(
        service, n, concurrency=64,
        tenant_of=lambda i: ALLOWED_TENANTS[(i // 100) % 2] if i % 100 == 0 else f"tenant-{i}",
        model_of=lambda i: f"model-{i % 200}",
    )  # fmt: skip
    text = await scrape(service.admin_port)
    samples = [(name, labels) for name, labels, _ in parse_samples(text) if name.startswith("carbon_proxy_")]
    tenants = {labels["tenant"] for _, labels in samples if "tenant" in labels}
    models = {labels["model"] for _, labels in samples if "model" in labels}
    assert tenants == set(ALLOWED_TENANTS) | {OTHER}
    assert OTHER in models and len(models) == MODEL_CAP + 1
    requests = [labels for name, labels in samples if name == "carbon_proxy_requests_total"]
    assert len(requests) <= (len(ALLOWED_TENANTS) + 1) * (MODEL_CAP + 1)
    total = sum(v for name, _, v in parse_samples(text) if name == "carbon_proxy_requests_total")
    assert total == n


async def test_request_energy_counters_equal_the_settled_receipts_and_the_engine() -> None:
    runner, url = await fast_upstream()
    svc = await start_service(url, FakeMeter(watts=300.0))
    try:
        await _send(svc, 40, tenant_of=lambda i: ALLOWED_TENANTS[i % 2])
    finally:
        await stop_service(svc)  # a last meter sample: every request settles
        await runner.cleanup()
    receipts = list(svc.proxy.receipts._receipts.values())  # type: ignore[attr-defined]
    assert len(receipts) == 40 and all(r.status == "final" for r in receipts)
    registry = svc.registry
    counted = sum(
        registry.get_sample_value("carbon_proxy_request_energy_joules_total", {"upstream": "sim", "model": "m", "tenant": t}) or 0.0
        for t in ALLOWED_TENANTS
    )
    assert counted == pytest.approx(sum(r.energy_joules for r in receipts), rel=1e-9)
    # every request is final, so the engine's attributed total is exactly their sum
    attributed = registry.get_sample_value("carbon_proxy_attributed_energy_joules_total", {"group": "0"})
    assert attributed == pytest.approx(counted, rel=1e-6)
    co2e = sum(registry.get_sample_value("carbon_proxy_request_co2e_grams_total", {"upstream": "sim", "model": "m", "tenant": t}) or 0.0
               for t in ALLOWED_TENANTS)  # fmt: skip
    assert co2e == pytest.approx(sum(r.co2e_grams for r in receipts), rel=1e-9)
