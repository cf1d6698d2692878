"""An intensity API that hangs, seen through a running proxy built from [carbon] config.
DESIGN 6 and 8: an outage never fails or slows a request; the last good value is used,
then the table, and the basis says so; startup and shutdown are bounded.

(Provider-level timeouts, 401, 429 and malformed answers: tests/carbon.)
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import orjson
from aiohttp import web
from helpers import start_upstream

from proxy.carbon.factory import build_intensity_provider

from .support import RawUpstream, assert_conserved, completion_body, post, response_head, settled, start, until


async def completion(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=completion_body(), content_type="application/json")


def latest(g_per_kwh: float) -> bytes:
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    body = orjson.dumps({"zone": "DE", "carbonIntensity": g_per_kwh, "datetime": hour.isoformat().replace("+00:00", "Z"), "isEstimated": False})
    return response_head(headers={"Content-Type": "application/json", "Content-Length": str(len(body))}) + body


def provider(api_url: str):
    carbon = {
        "provider": "electricitymaps",
        "zone": "DE",
        "url": f"{api_url}/v3",
        "poll_seconds": 0.1,
        "timeout_seconds": 0.2,
        "startup_wait_seconds": 0.3,
    }
    return build_intensity_provider(carbon, environ={"ELECTRICITYMAPS_TOKEN": "em-test-token"})


async def test_an_api_that_never_answers_delays_neither_startup_nor_requests() -> None:
    api = await RawUpstream(lambda head, body: ["hang"]).start()
    runner, url = await start_upstream({"/v1/completions": completion})
    started = time.monotonic()
    proxy = await start(url, intensity=provider(api.url))
    try:
        assert time.monotonic() - started < 1.5  # startup waits at most startup_wait_seconds
        for _ in range(5):
            began = time.monotonic()
            status, _, headers = await post(proxy, "/v1/completions", {"model": "m", "prompt": "x"})
            assert status == 200 and time.monotonic() - began < 0.5
            assert "intensity=table:DEU; stale=true" in headers["X-Emissions-Basis"]
            assert float(headers["X-Carbon-Intensity"]) > 0
        assert len(api.requests) >= 1  # it was asked, and is still hanging
        receipts = await settled(proxy, proxy.request_ids)
        assert all("intensity=table:DEU; stale=true" in r.basis for r in receipts.values())
        assert_conserved(proxy, receipts)
        began = time.monotonic()
        await proxy.close()
        assert time.monotonic() - began < 2.0  # a poll stuck on the API does not hold shutdown
    finally:
        await proxy.close()
        await api.close()
        await runner.cleanup()


async def test_an_api_that_hangs_after_answering_keeps_the_last_good_value_flagged_stale() -> None:
    answered: list[int] = []

    def script(head: bytes, body: bytes) -> list:
        if not answered:
            answered.append(1)
            return [latest(321.0)]
        return ["hang"]

    api = await RawUpstream(script).start()
    runner, url = await start_upstream({"/v1/completions": completion})
    proxy = await start(url, intensity=provider(api.url))
    try:
        status, _, headers = await post(proxy, "/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 200 and headers["X-Carbon-Intensity"] == "321"
        assert "intensity=electricitymaps:DE" in headers["X-Emissions-Basis"] and "stale" not in headers["X-Emissions-Basis"]
        intensity = proxy.service.proxy.intensity
        await until(lambda: "stale=true" in intensity.current().basis(), 3, "the hung poll to time out")
        for _ in range(5):
            began = time.monotonic()
            status, _, headers = await post(proxy, "/v1/completions", {"model": "m", "prompt": "x"})
            assert status == 200 and time.monotonic() - began < 0.5
            assert headers["X-Carbon-Intensity"] == "321"  # the last good value, not the table's
            assert "intensity=electricitymaps:DE; stale=true" in headers["X-Emissions-Basis"]
        receipts = await settled(proxy, proxy.request_ids)
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await api.close()
        await runner.cleanup()
