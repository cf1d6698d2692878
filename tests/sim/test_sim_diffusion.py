"""Diffusion endpoints: time = steps x seconds_per_step x megapixels x images, one job at a time."""

from __future__ import annotations

import asyncio
import base64
import time

import aiohttp
import orjson
import pytest

from proxy.sim import SimServer
from proxy.sim.diffusion import tiny_png


async def timed_post(server: SimServer, path: str, body: dict) -> tuple[float, dict]:
    async with aiohttp.ClientSession(server.url) as session:
        started = time.monotonic()
        async with session.post(path, json=body) as response:
            assert response.status == 200, await response.text()
            result = orjson.loads(await response.read())
        return time.monotonic() - started, result


async def test_a1111_txt2img_timing_shape_and_energy(sim_server: SimServer) -> None:
    body = {"prompt": "a wind turbine", "steps": 10, "width": 512, "height": 512, "batch_size": 2}
    elapsed, result = await timed_post(sim_server, "/sdapi/v1/txt2img", body)
    expected = 10 * 0.02 * 0.25 * 2  # steps x s/step x megapixels x images
    assert expected <= elapsed < expected + 0.15
    assert len(result["images"]) == 2
    assert base64.b64decode(result["images"][0]).startswith(b"\x89PNG")
    assert result["parameters"]["steps"] == 10 and result["parameters"]["batch_size"] == 2
    info = orjson.loads(result["info"])
    assert info["width"] == 512 and len(info["all_seeds"]) == 2
    gpu = sim_server.gpu
    (request_id,) = gpu.request_ids()
    dynamic = gpu.ground_truth(request_id).dynamic_joules
    assert dynamic == pytest.approx(gpu.power_model.diffusion_watts(0.5) * 2 * expected, rel=0.25)
    assert sim_server.stats.images == 2


async def test_openai_images_are_serialised_with_a1111_jobs(sim_server: SimServer) -> None:
    openai_body = {"prompt": "solar farm", "size": "1024x1024"}  # 4 default steps: 0.08 s
    a1111_body = {"prompt": "dam", "steps": 8, "width": 1024, "height": 1024}  # 0.16 s
    started = time.monotonic()
    (_, images), (_, _) = await asyncio.gather(
        timed_post(sim_server, "/v1/images/generations", openai_body),
        timed_post(sim_server, "/sdapi/v1/txt2img", a1111_body),
    )
    assert time.monotonic() - started >= 0.24  # one job at a time, as AUTOMATIC1111 does
    assert set(images) == {"created", "data"} and set(images["data"][0]) >= {"b64_json"}


async def test_bad_sizes_are_rejected(sim_server: SimServer) -> None:
    async with aiohttp.ClientSession(sim_server.url) as session:
        async with session.post("/v1/images/generations", json={"prompt": "x", "size": "huge"}) as response:
            assert response.status == 400
        async with session.post("/sdapi/v1/txt2img", json={"steps": 0}) as response:
            assert response.status == 422


def test_png_is_valid() -> None:
    png = tiny_png(0x123456)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR" and png.endswith(b"IEND\xaeB`\x82")
