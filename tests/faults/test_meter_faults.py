"""Meter faults seen through a running proxy: a meter that hangs, and one that throws or
returns garbage while streams are open. DESIGN 8: a metering failure never fails, blocks
or slows a request; the figures are flagged; once the meter is back every request
settles and request energy + idle == measured (the energy drawn during the outage is
covered by the next good sample, never dropped).

(Sampler-level raise/hang/garbage handling: tests/meters/test_sampler.py; a failing
meter's basis flag: tests/proxy/test_faults.py.)
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import aiohttp
from aiohttp import web
from helpers import FakeMeter, start_upstream

from proxy.meters.base import EnergySample

from .support import CHAT, assert_conserved, check_still_serves, completion_body, post, settled, sse_event, start, until


class FaultyMeter(FakeMeter):
    """FakeMeter (constant power) whose reads can hang, raise or return garbage."""

    def __init__(self) -> None:
        super().__init__(watts=300.0)
        self.modes: itertools.cycle[str] | None = None
        self.mode = "ok"
        self.release = asyncio.Event()

    async def read(self) -> EnergySample:
        mode = next(self.modes) if self.modes is not None else self.mode
        if mode == "hang":
            await self.release.wait()  # until the test ends (cancelled by the sampler's timeout)
        if mode == "raise":
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        if mode == "nan":
            return EnergySample(time.monotonic(), {"0": math.nan})
        if mode == "backwards":
            return EnergySample(time.monotonic(), {"0": 0.0})
        if mode == "not-a-sample":
            return {"0": 1.0}  # type: ignore[return-value]
        return await super().read()


async def completion(request: web.Request) -> web.Response:
    await request.read()
    await asyncio.sleep(0.05)
    return web.Response(body=completion_body(), content_type="application/json")


async def stream(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(10):
        await response.write(sse_event(i))
        await asyncio.sleep(0.02)
    await response.write(b"data: [DONE]\n\n")
    return response


async def ready(proxy) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{proxy.service.admin_port}/readyz") as response:
            return response.status


async def test_a_hanging_meter_never_slows_a_request_and_the_outage_is_accounted_after() -> None:
    runner, url = await start_upstream({"/v1/completions": completion, CHAT: stream})
    meter = FaultyMeter()
    proxy = await start(url, meter=meter)
    sampler = proxy.service.proxy.sampler
    assert sampler is not None
    sampler._read_timeout = 0.15  # the default is 5 periods, at least 1 s
    try:
        meter.mode = "hang"
        await until(lambda: not sampler.health.ok, 2, "the sampler to give up on the hung read")
        assert sampler.health.last_error == "read timed out"

        async def timed(call) -> float:
            started = time.monotonic()
            await call
            return time.monotonic() - started

        calls = [post(proxy, "/v1/completions", {"model": "m", "prompt": "x"}) for _ in range(5)]
        calls += [post(proxy, CHAT, {"model": "m", "stream": True}) for _ in range(5)]
        durations = await asyncio.gather(*(timed(c) for c in calls))
        # Served at the upstream's own pace (50 ms; streams 10 x 20 ms), not the meter's.
        assert max(durations) < 1.0, durations
        status, _, headers = await post(proxy, "/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 200 and "meter_status=down" in headers["X-Emissions-Basis"]
        assert await ready(proxy) == 503

        meter.mode = "ok"
        receipts = await settled(proxy, proxy.request_ids)
        assert await ready(proxy) == 200
        assert all(r.energy_joules > 0 for r in receipts.values())  # the outage was metered after all
        assert_conserved(proxy, receipts)

        meter.mode = "hang"  # shutdown's last sample is bounded by the same timeout
        started = time.monotonic()
        await proxy.close()
        assert time.monotonic() - started < 2.0
    finally:
        meter.release.set()
        await proxy.close()
        await runner.cleanup()


async def test_a_meter_that_throws_and_returns_garbage_mid_stream_loses_no_joule() -> None:
    runner, url = await start_upstream({"/v1/completions": completion, CHAT: stream})
    meter = FaultyMeter()
    proxy = await start(url, meter=meter)
    sampler = proxy.service.proxy.sampler
    assert sampler is not None
    try:
        meter.modes = itertools.cycle(["ok", "raise", "nan", "ok", "not-a-sample", "backwards", "raise", "ok"])
        calls = [post(proxy, CHAT, {"model": "m", "stream": True}) for _ in range(8)]
        calls += [post(proxy, "/v1/completions", {"model": "m", "prompt": "x"}) for _ in range(4)]
        results = await asyncio.gather(*calls)
        for status, body, headers in results:
            assert status == 200
            if headers["Content-Type"].startswith("text/event-stream"):
                assert b"".join(sse_event(i) for i in range(10)) in body
                assert body.endswith(b"data: [DONE]\n\n") and b": emissions {" in body
        assert sampler.health.total_failures > 0
        meter.modes = None
        await check_still_serves(proxy, "/v1/completions", {"model": "m", "prompt": "x"})
        receipts = await settled(proxy, proxy.request_ids)
        assert_conserved(proxy, receipts)
    finally:
        await proxy.close()
        await runner.cleanup()
