"""Recorded exchanges of the engines not run here (vLLM, TGI, Ollama, llama.cpp's
llama-server, SGLang, AUTOMATIC1111, OpenAI images), replayed by a local server through
the proxy. Each fixture in transcripts/ says where its bytes come from.

What must hold: the client gets the bytes the engine would have sent it directly, except
the documented additions (the `: emissions` SSE comment, `emissions` inside a usage
chunk or a final NDJSON line; and, when the client did not ask for usage, the usage chunk
and `"usage":null` fields the proxy's own include_usage caused); the receipt's counts
are the engine's; `tokens=estimated` appears exactly when a count is not the engine's own.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from helpers import FakeMeter, start_proxy

from proxy.dialects.framing import split_events
from proxy.receipts.model import Receipt
from proxy.serve import Service

FOLDER = Path(__file__).parent / "transcripts"
FIXTURES = {path.stem: json.loads(path.read_text()) for path in sorted(FOLDER.glob("*.json"))}
CASES = [(name, exchange["name"]) for name, fixture in FIXTURES.items() for exchange in fixture["exchanges"]]


def _exchange(fixture: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in fixture["exchanges"] if e["name"] == name)


def _wants_usage(request: Any) -> bool:
    options = request.get("stream_options") if isinstance(request, dict) else None
    return isinstance(options, dict) and options.get("include_usage") is True


def _response_for(exchange: dict[str, Any], wants_usage: bool) -> dict[str, Any]:
    """The response the engine gives a request that does (not) ask for usage."""
    for response in exchange["responses"]:
        if response["include_usage"] is None or response["include_usage"] == wants_usage:
            return response
    raise AssertionError(f"{exchange['name']}: no recorded response for include_usage={wants_usage}")


async def _replay_server(fixture: dict[str, Any]) -> tuple[web.AppRunner, str, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        tokenize = fixture.get("tokenize")
        if tokenize is not None and request.path == tokenize["path"]:
            seen.append({"path": request.path, "body": json.loads(body)})
            return web.Response(body=tokenize["body"].encode(), content_type="application/json")
        name = request.headers.get("X-Transcript")
        if name is None:
            return web.Response(status=404, text="no such endpoint")
        exchange = _exchange(fixture, name)
        assert request.path == exchange["path"]
        data = json.loads(body)
        seen.append({"path": request.path, "body": data})
        recorded = _response_for(exchange, _wants_usage(data))
        payload = recorded["body"].encode()
        content_type = recorded["headers"]["Content-Type"]
        if "event-stream" not in content_type and "ndjson" not in content_type:
            return web.Response(status=recorded["status"], body=payload, headers=recorded["headers"])
        response = web.StreamResponse(status=recorded["status"], headers=recorded["headers"])
        await response.prepare(request)
        # As engines do: one write per event or line; every other one split in two, so the
        # proxy reassembles events across reads.
        pieces = split_events(payload) if "event-stream" in content_type else payload.splitlines(keepends=True)
        for index, piece in enumerate(pieces):
            if index % 2:
                cut = len(piece) // 3
                await response.write(piece[:cut])
                await asyncio.sleep(0)
                piece = piece[cut:]
            await response.write(piece)
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", seen


@pytest.fixture
async def replay(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Service, list[dict[str, Any]]]]:
    fixture = FIXTURES[request.param]
    runner, url, seen = await _replay_server(fixture)
    service = await start_proxy(url, meter=FakeMeter(), dialect=fixture["dialect"])
    # What attribution was given as each request's prompt work (issue 12 item 6).
    service.proxy.on_record(lambda receipt, figures, exchange: seen.append({"attributed_prompt": exchange.usage.prompt_tokens}))
    yield service, seen
    await service.stop()
    await runner.cleanup()


_NULL_USAGE = re.compile(rb',\s*"usage":\s*null|"usage":\s*null,\s*')
_EMISSIONS_FIELD = re.compile(rb',"emissions":\{[^{}]*\}')


def _data(event: bytes) -> Any:
    text = event.decode().strip()
    assert text.startswith("data:"), event
    return json.loads(text[5:])


def _assert_sse_same(client: bytes, direct: bytes, client_wants_usage: bool) -> None:
    events = split_events(client)
    comments = [e for e in events if e.startswith(b": emissions ")]
    in_usage = [e for e in events if b'"emissions":{' in e and not e.startswith(b":")]
    # The figures come once: inside the usage chunk the client asked for, else as a comment.
    assert len(comments) + len(in_usage) == 1, client
    for comment in comments:
        figures = json.loads(comment[len(b": emissions ") :])
        assert figures["energy_joules"] > 0 and figures["status"] in ("provisional", "final")
        events.remove(comment)
    expected = split_events(direct)
    if not client_wants_usage:
        expected = [_NULL_USAGE.sub(b"", e) for e in expected]  # documented: see module doc
    assert len(events) == len(expected), (events, expected)
    for got, want in zip(events, expected):
        if got == want:
            continue
        # Only the usage chunk may differ, and only by the emissions placed in it.
        got_json, want_json = _data(got), _data(want)
        assert got_json["usage"].pop("emissions")["energy_joules"] > 0
        assert got_json == want_json


def _assert_ndjson_same(client: bytes, direct: bytes) -> None:
    lines = client.splitlines(keepends=True)
    final = lines[-1]
    assert b'"done":true' in final and b'"emissions":{' in final
    assert json.loads(final)["emissions"]["energy_joules"] > 0
    lines[-1] = _EMISSIONS_FIELD.sub(b"", final, count=1)
    assert b"".join(lines) == direct


async def _receipt(service: Service, request_id: str, expect: dict[str, Any]) -> Receipt:
    receipt = None
    for _ in range(200):
        receipt = await service.proxy.receipts.get(request_id)
        if receipt is not None and receipt.prompt_tokens == expect.get("prompt_tokens"):
            break
        await asyncio.sleep(0.025)
    assert receipt is not None
    return receipt


@pytest.mark.parametrize(("replay", "name"), CASES, indirect=["replay"], ids=[f"{f}:{n}" for f, n in CASES])
async def test_replayed_exchange_reaches_the_client_unchanged_and_counted(
    replay: tuple[Service, list[dict[str, Any]]], name: str, request: pytest.FixtureRequest
) -> None:
    fixture_name = request.node.callspec.params["replay"]
    service, seen = replay
    fixture = FIXTURES[fixture_name]
    exchange = _exchange(fixture, name)
    wants_usage = _wants_usage(exchange["request"])
    direct = _response_for(exchange, wants_usage)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{service.public_port}{exchange['path']}", json=exchange["request"], headers={"X-Transcript": name}
        ) as response:
            body = await response.read()
            headers = response.headers
            assert response.status == direct["status"]
    content_type = direct["headers"]["Content-Type"]
    assert headers["Content-Type"] == content_type
    for key, value in direct["headers"].items():
        if key.lower().startswith("x-"):
            assert headers[key] == value  # the engine's own headers pass through
    if "event-stream" in content_type:
        _assert_sse_same(body, direct["body"].encode(), wants_usage)
    elif "ndjson" in content_type:
        _assert_ndjson_same(body, direct["body"].encode())
    else:
        assert body == direct["body"].encode()
        assert float(headers["X-Energy-Joules"]) > 0
    expect = exchange["expect"]
    receipt = await _receipt(service, headers["X-Carbon-Receipt-Id"], expect)
    for key in ("prompt_tokens", "output_tokens", "cached_tokens", "images", "work_units"):
        if key in expect:
            assert getattr(receipt, key) == pytest.approx(expect[key]), key
    assert ("tokens=estimated" in receipt.basis) is expect["tokens_estimated"], receipt.basis
    if expect.get("prompt_tokens") is not None:
        # Prefix-cache hits did no prefill work: attribution is given computed tokens only.
        attributed = [s["attributed_prompt"] for s in seen if "attributed_prompt" in s]
        computed = expect["prompt_tokens"] - expect.get("cached_tokens", 0)
        assert attributed[-1] == computed or (expect["tokens_estimated"] and attributed[-1] > 0)
    upstream_request = next(s for s in seen if s.get("path") == exchange["path"])
    if fixture["dialect"] == "openai" or exchange["path"].startswith("/v1/chat"):
        if exchange["request"].get("stream"):
            assert _wants_usage(upstream_request["body"])  # the proxy asked for usage
