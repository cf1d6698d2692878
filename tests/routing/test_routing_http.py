"""Carbon routing through the running proxy: real local upstreams, the header, receipts,
the metric, residency errors and passive health."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web
from helpers import FakeMeter, start_upstream
from prometheus_client.parser import text_string_to_metric_families

from proxy.carbon.intensity import ConstantIntensity
from proxy.config import config_from_dict
from proxy.errors import ConfigError
from proxy.receipts.model import MemoryReceiptStore
from proxy.routing.header import parse_header
from proxy.serve import Service


def _chat(name: str):
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        assert "X-Carbon-Route" not in request.headers  # a client's copy never reaches the upstream
        return web.json_response(headers={"X-Carbon-Route": "upstream=spoofed; avoided_grams=1000"}, data={
            "id": "x", "object": "chat.completion", "model": "m", "served_by": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
        })

    return handler


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def _service(upstreams: list[dict], routing: dict, tenants: dict | None = None) -> Service:
    config = config_from_dict({
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
        "upstreams": upstreams,
        "routing": routing,
        "tenants": tenants or {},
        "carbon": {"intensity": 450, "pue": 1.2},
        "attribution": {"idle_power_watts": 60},
        "receipts": {"path": ":memory:"},
    })
    devices = tuple(d for u in upstreams for d in u.get("devices", []))
    service = Service(config, meter=FakeMeter(devices=devices), intensity=ConstantIntensity(450), receipts=MemoryReceiptStore())
    await service.start()
    return service


async def _metric(admin_port: int, name: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
            text = await response.text()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def test_carbon_policy_routes_to_the_cleaner_site_and_says_so_everywhere() -> None:
    runners, urls = [], {}
    for name in ("nordic", "central"):
        runner, urls[name] = await start_upstream({"/{tail:.*}": _chat(name)})
        runners.append(runner)
    service = await _service(
        [
            {"name": "central", "url": urls["central"], "models": ["m"], "devices": ["0"], "zone": "DE", "intensity": 420},
            {"name": "nordic", "url": urls["nordic"], "models": ["m"], "devices": ["1"], "zone": "SE", "intensity": 30},
        ],
        {"policy": "carbon", "baseline": "round_robin"},
    )
    base = f"http://127.0.0.1:{service.public_port}"
    headers_seen = []
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(6):
                async with session.post(f"{base}/v1/chat/completions", json={"model": "m", "max_tokens": 30,
                                        "messages": [{"role": "user", "content": "hello"}]},
                                        headers={"X-Carbon-Route": "upstream=client-said"}) as response:
                    assert response.status == 200
                    assert len(response.headers.getall("X-Carbon-Route")) == 1  # the upstream's copy is dropped
                    assert (await response.json())["served_by"] == "nordic"
                    headers_seen.append((response.headers["X-Carbon-Receipt-Id"], parse_header(response.headers["X-Carbon-Route"])))
                    # The request's own figures use its upstream's intensity, not the proxy-wide one.
                    assert float(response.headers["X-Carbon-Intensity"]) == pytest.approx(30)
            await asyncio.sleep(0.3)
            receipts = [await service.proxy.receipts.get(receipt_id) for receipt_id, _ in headers_seen]
            assert all(r is not None and r.route is not None for r in receipts)
            for (_, fields), receipt in zip(headers_seen, receipts):
                assert parse_header(receipt.route) == fields and receipt.upstream == "nordic"
                assert receipt.avoided_grams == pytest.approx(float(fields["avoided_grams"]), rel=1e-4)
            # Round robin alternates central / nordic: half the requests avoided something.
            assert [f["baseline_upstream"] for _, f in headers_seen] == ["central", "nordic"] * 3
            total = sum(r.avoided_grams for r in receipts)
            assert total > 0
            assert await _metric(service.admin_port, "carbon_proxy_avoided_co2e_grams_total") == pytest.approx(total, rel=1e-6)
            assert await _metric(service.admin_port, "carbon_proxy_routed_requests_total") == 6
    finally:
        await service.stop()
        for runner in runners:
            await runner.cleanup()


async def test_residency_gets_a_json_error_and_a_dead_upstream_is_routed_around() -> None:
    runner, url = await start_upstream({"/{tail:.*}": _chat("central")})
    service = await _service(
        [
            {"name": "nordic", "url": _dead_url(), "models": ["m"], "devices": ["1"], "zone": "SE", "intensity": 30},
            {"name": "central", "url": url, "models": ["m"], "devices": ["0"], "zone": "DE", "intensity": 420},
        ],
        {"policy": "carbon", "unhealthy_after_failures": 1, "unhealthy_seconds": 60},
        {"header": "X-Tenant-Id", "regions": {"nordic-only": ["SE"]}},
    )
    base = f"http://127.0.0.1:{service.public_port}"
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/v1/chat/completions", json=body) as response:
                assert response.status == 502  # the cleanest site is down: this one fails ...
            await asyncio.sleep(0.1)
            async with session.post(f"{base}/v1/chat/completions", json=body) as response:
                assert response.status == 200 and (await response.json())["served_by"] == "central"  # ... then it is skipped
            async with session.post(f"{base}/v1/chat/completions", json=body, headers={"X-Tenant-Id": "nordic-only"}) as response:
                assert response.status == 503
                error = (await response.json())["error"]
                assert error["type"] == "no_allowed_upstream" and "SE" in error["message"]
    finally:
        await service.stop()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("upstream", "routing", "key"),
    [
        ({"intensity": 30, "carbon": {"intensity": 30}}, {}, "upstreams[0].intensity"),
        ({"carbon": {"provider": "nope"}}, {}, "upstreams[0].carbon.provider"),
        ({"carbon": {"provider": "sim", "zone": "Atlantis"}}, {}, "upstreams[0].carbon.zone"),
        ({"zone": "XX-NOWHERE"}, {}, "upstreams[0].zone"),
        ({}, {"policy": "greenest"}, "routing.policy"),
        ({}, {"max_share": 2}, "routing.max_share"),
        ({}, {"polcy": "carbon"}, "routing.polcy"),
    ],
)
def test_config_errors_name_the_key(upstream: dict, routing: dict, key: str) -> None:
    from proxy.routing.place import build_sites

    with pytest.raises(ConfigError) as caught:
        config = config_from_dict({"upstreams": [{"url": "http://a", **upstream}], "routing": routing})
        build_sites(config.upstreams, default_intensity=ConstantIntensity(1), default_pue=1.0)
    assert caught.value.key == key


def test_tenant_regions_are_checked() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"upstreams": [{"url": "http://a"}], "tenants": {"regions": {"t": []}}})
    assert caught.value.key == "tenants.regions.t"


def test_one_device_group_cannot_be_in_two_places() -> None:
    from proxy.routing.place import build_sites

    config = config_from_dict({"upstreams": [{"name": "a", "url": "http://a", "zone": "SE"}, {"name": "b", "url": "http://b", "zone": "DE"}]})
    with pytest.raises(ConfigError) as caught:
        build_sites(config.upstreams, default_intensity=ConstantIntensity(1), default_pue=1.0)
    assert caught.value.key == "upstreams[1].zone" and "'a'" in caught.value.reason
