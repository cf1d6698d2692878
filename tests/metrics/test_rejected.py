"""Requests the proxy answers itself are counted by reason, never as forwarded requests."""

from __future__ import annotations

import aiohttp

from helpers import start_proxy

from .tools import fast_upstream, parse_samples, scrape, stop_service


async def test_rejections_are_counted_by_reason() -> None:
    runner, url = await fast_upstream()
    service = await start_proxy(url, upstream={"routes": ["/v1/"]}, server={"max_body_bytes": 100})
    base = f"http://127.0.0.1:{service.public_port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/nowhere", json={}) as response:
                assert response.status == 404
            async with session.post(base + "/v1/chat/completions", data=b"x" * 1000) as response:
                assert response.status == 413
            async with session.post(base + "/v1/chat/completions", json={"model": "m", "messages": []}) as response:
                assert response.status == 200
        samples = parse_samples(await scrape(service.admin_port))
        rejected = {labels["reason"]: value for name, labels, value in samples if name == "carbon_proxy_rejected_requests_total"}
        assert rejected["no_route"] == 1.0 and rejected["request_too_large"] == 1.0
        assert rejected["carbon_budget_exceeded"] == 0.0  # every reason is exported from zero
        forwarded = sum(value for name, _, value in samples if name == "carbon_proxy_requests_total")
        assert forwarded == 1.0
        overhead = [value for name, labels, value in samples if name == "carbon_proxy_overhead_seconds_count"]
        assert overhead == [1.0]
    finally:
        await stop_service(service)
        await runner.cleanup()
