"""Requests reach the upstream their path or model names, and no other."""

from __future__ import annotations

import aiohttp
from yarl import URL
from aiohttp import web
from helpers import FakeMeter, start_upstream

from proxy.carbon.intensity import ConstantIntensity
from proxy.config import config_from_dict
from proxy.receipts.model import MemoryReceiptStore
from proxy.routing import Router
from proxy.serve import Service


def _named(name: str):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"served_by": name, "path": request.raw_path})

    return handler


async def test_model_then_longest_prefix_then_default() -> None:
    runners, urls = [], {}
    for name in ("big", "images", "default"):
        runner, url = await start_upstream({"/{tail:.*}": _named(name)})
        runners.append(runner)
        urls[name] = url
    config = config_from_dict(
        {
            "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
            "upstreams": [
                {"name": "big", "url": urls["big"], "models": ["llama-70b"], "devices": ["0", "1"]},
                {"name": "images", "url": urls["images"], "routes": ["/v1/images/"], "dialect": "diffusion", "devices": ["2"]},
                {"name": "default", "url": urls["default"], "devices": ["3"]},
            ],
            "receipts": {"path": ":memory:"},
        }
    )
    service = Service(config, meter=FakeMeter(devices=("0", "1", "2", "3")), intensity=ConstantIntensity(100), receipts=MemoryReceiptStore())
    await service.start()
    base = f"http://127.0.0.1:{service.public_port}"
    try:
        async with aiohttp.ClientSession() as session:
            cases = [
                ("/v1/chat/completions", {"model": "llama-70b"}, "big"),
                ("/v1/chat/completions", {"model": "llama-8b"}, "default"),
                ("/v1/images/generations?x=%2F", {"prompt": "p"}, "images"),
            ]
            for path, body, expected in cases:
                async with session.post(URL(base + path, encoded=True), json=body) as response:
                    data = await response.json()
                    assert data["served_by"] == expected, path
                    assert data["path"] == path  # path and query forwarded byte for byte
    finally:
        await service.stop()
        for runner in runners:
            await runner.cleanup()


def test_no_route_means_no_upstream() -> None:
    config = config_from_dict({"upstreams": [{"name": "a", "url": "http://a", "routes": ["/v1/"]}]})
    assert Router(config.upstreams).route("/admin", None) is None
