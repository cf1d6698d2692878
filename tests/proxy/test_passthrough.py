"""Byte-for-byte passthrough: the client gets exactly the upstream bytes, plus the
figures the proxy adds at the end of a stream."""

from __future__ import annotations

import asyncio
import gzip
import os

import aiohttp
import orjson
import pytest
from aiohttp import web
from helpers import start_proxy, start_upstream

# A recorded vLLM-style stream (the client asked for usage, so no hiding is involved).
SSE_BODY = (
    b'data: {"id":"cmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"cmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hel\\u00e9"},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"cmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" data: [DONE]"},"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"cmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}\n\n'
    b"data: [DONE]\n\n"
)

NDJSON_BODY = (
    b'{"model":"llama3","created_at":"2024-01-01T00:00:00Z","response":"Hi","done":false}\n'
    b'{"model":"llama3","created_at":"2024-01-01T00:00:00Z","response":" there","done":false}\n'
    b'{"model":"llama3","created_at":"2024-01-01T00:00:01Z","response":"","done":true,"done_reason":"stop","total_duration":5000000,"load_duration":100,"prompt_eval_count":12,"prompt_eval_duration":2000000,"eval_count":2,"eval_duration":3000000}\n'
)


def _split_handler(body: bytes, cut: int, content_type: str) -> web.StreamResponse:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        await response.write(body[:cut])
        await asyncio.sleep(0.002)  # make the two parts two reads at the proxy
        await response.write(body[cut:])
        await response.write_eof()
        return response

    return handler  # type: ignore[return-value]


async def _post(session: aiohttp.ClientSession, url: str, payload: dict) -> tuple[int, bytes, dict]:
    async with session.post(url, json=payload) as response:
        return response.status, await response.read(), dict(response.headers)


async def test_sse_split_at_every_byte_reaches_client_unchanged_with_usage_figures() -> None:
    state = {"cut": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _split_handler(SSE_BODY, state["cut"], "text/event-stream")(request)

    runner, url = await start_upstream({"/v1/chat/completions": handler})
    service = await start_proxy(url)
    target = f"http://127.0.0.1:{service.public_port}/v1/chat/completions"
    payload = {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "messages": []}
    try:
        async with aiohttp.ClientSession() as session:
            for cut in range(len(SSE_BODY) + 1):
                state["cut"] = cut
                status, body, _ = await _post(session, target, payload)
                assert status == 200
                events = body.split(b"\n\n")
                usage_event = orjson.loads(events[3][len(b"data: ") :])
                emissions = usage_event["usage"].pop("emissions")
                assert emissions["energy_joules"] > 0 and emissions["status"] == "provisional"
                original = SSE_BODY.split(b"\n\n")[3]
                # The usage chunk is the same JSON plus `emissions`; every other byte is identical.
                assert usage_event == orjson.loads(original[len(b"data: ") :])
                assert body == SSE_BODY.replace(original, events[3])
    finally:
        await service.stop()
        await runner.cleanup()


async def test_sse_without_usage_request_hides_usage_and_adds_comment() -> None:
    """The proxy asked for usage on the client's behalf: the client must not see it."""
    seen: list[dict] = []
    plain = SSE_BODY.replace(b',"usage":null', b"")

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        return await _split_handler(SSE_BODY, 100, "text/event-stream")(request)

    runner, url = await start_upstream({"/v1/chat/completions": handler})
    service = await start_proxy(url)
    try:
        async with aiohttp.ClientSession() as session:
            status, body, _ = await _post(session, f"http://127.0.0.1:{service.public_port}/v1/chat/completions", {"model": "m", "stream": True})
        assert seen[0]["stream_options"] == {"include_usage": True}
        assert status == 200
        usage_only = plain.split(b"\n\n")[3] + b"\n\n"
        expected_prefix = plain.replace(usage_only, b"").replace(b"data: [DONE]\n\n", b"")
        assert body.startswith(expected_prefix)
        rest = body[len(expected_prefix) :]
        assert rest.startswith(b": emissions {") and rest.endswith(b"\n\ndata: [DONE]\n\n")
        figures = orjson.loads(rest[len(b": emissions ") : rest.index(b"\n\n")])
        assert set(figures) >= {"energy_joules", "co2e_grams", "co2e_embodied_grams", "carbon_intensity_g_per_kwh", "basis"}
    finally:
        await service.stop()
        await runner.cleanup()


async def test_ndjson_split_at_every_byte_gets_emissions_in_done_line() -> None:
    state = {"cut": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _split_handler(NDJSON_BODY, state["cut"], "application/x-ndjson")(request)

    runner, url = await start_upstream({"/api/generate": handler})
    service = await start_proxy(url, dialect="ollama")
    try:
        async with aiohttp.ClientSession() as session:
            for cut in range(0, len(NDJSON_BODY) + 1, 3):
                state["cut"] = cut
                status, body, _ = await _post(session, f"http://127.0.0.1:{service.public_port}/api/generate", {"model": "llama3", "prompt": "hi"})
                assert status == 200
                lines = body.splitlines(keepends=True)
                assert b"".join(lines[:2]) == b"".join(NDJSON_BODY.splitlines(keepends=True)[:2])
                final = orjson.loads(lines[2])
                emissions = final.pop("emissions")
                assert final == orjson.loads(NDJSON_BODY.splitlines()[2])
                assert emissions["energy_joules"] > 0
    finally:
        await service.stop()
        await runner.cleanup()


@pytest.mark.parametrize("kind", ["binary", "gzip-json", "gzip-sse"])
async def test_binary_and_compressed_bodies_pass_unchanged(kind: str) -> None:
    if kind == "binary":
        body, headers = os.urandom(300_000), {"Content-Type": "application/octet-stream"}
    elif kind == "gzip-json":
        body = gzip.compress(orjson.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}))
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    else:
        body, headers = gzip.compress(SSE_BODY), {"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, headers=headers)

    runner, url = await start_upstream({"/v1/chat/completions": handler})
    service = await start_proxy(url)
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.post(f"http://127.0.0.1:{service.public_port}/v1/chat/completions", json={"model": "m"}) as response:
                received = await response.read()
                assert response.status == 200
                assert received == body
                assert response.headers.get("Content-Encoding") == headers.get("Content-Encoding")
                if kind == "gzip-json":  # buffered: figures in headers, tokens read through gzip
                    assert float(response.headers["X-Energy-Joules"]) > 0
                    receipt_id = response.headers["X-Carbon-Receipt-Id"]
        if kind == "gzip-json":
            receipt = await service.proxy.receipts.get(receipt_id)
            assert receipt is not None and receipt.prompt_tokens == 4 and receipt.output_tokens == 2
    finally:
        await service.stop()
        await runner.cleanup()


async def test_large_upload_streams_through_and_headers_are_proxied() -> None:
    received: dict = {}

    async def handler(request: web.Request) -> web.Response:
        data = await request.read()
        received.update(size=len(data), headers=dict(request.headers), body_head=data[:4])
        return web.json_response({"ok": True})

    runner, url = await start_upstream({"/upload": handler})
    service = await start_proxy(url, dialect="generic")
    payload = os.urandom(10 * 1024 * 1024)

    async def chunks():
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    try:
        async with aiohttp.ClientSession() as session:
            headers = {
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "must-not-pass",
                "X-Energy-Joules": "0.0001",
                "X-Forwarded-For": "6.6.6.6",
                "Authorization": "Bearer sk-test",
            }
            async with session.post(f"http://127.0.0.1:{service.public_port}/upload?x=1", data=chunks(), headers=headers) as response:
                assert response.status == 200
                assert float(response.headers["X-Energy-Joules"]) > 0
        assert received["size"] == len(payload) and received["body_head"] == payload[:4]
        up = {k.lower(): v for k, v in received["headers"].items()}
        assert "x-secret-hop" not in up  # listed in Connection: hop-by-hop
        assert "x-energy-joules" not in up  # emissions headers never reach upstream
        assert up["x-forwarded-for"] == "127.0.0.1"  # untrusted chain replaced
        assert up["x-forwarded-proto"] == "http"
        assert up["host"] == url.removeprefix("http://")  # the upstream's own host
        assert up["authorization"] == "Bearer sk-test"
        assert len(up["x-request-id"]) == 32
    finally:
        await service.stop()
        await runner.cleanup()


async def test_upstream_emissions_headers_are_replaced_by_the_proxys_own() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"usage": {"prompt_tokens": 1, "completion_tokens": 1}}, headers={"X-CO2e-Grams": "0", "X-Emissions-Basis": "spoofed"})

    runner, url = await start_upstream({"/v1/completions": handler})
    service = await start_proxy(url)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{service.public_port}/v1/completions", json={"model": "m", "prompt": "x"}) as response:
                assert response.headers.getall("X-Emissions-Basis") == [response.headers["X-Emissions-Basis"]]
                assert response.headers["X-Emissions-Basis"].startswith("meter=fake")
                assert float(response.headers["X-CO2e-Grams"]) > 0
    finally:
        await service.stop()
        await runner.cleanup()
