"""The official `openai` client sees through the proxy exactly what it sees directly,
plus the figures of DESIGN.md section 3."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import openai
import pytest
from helpers import start_proxy

from proxy.meters.sim import SimMeter
from proxy.sim.config import SimModelConfig
from proxy.sim.gpu import SimGpu
from proxy.sim.server import run_sim_server

MESSAGES = [{"role": "user", "content": "Tell me about grid carbon intensity."}]


@pytest.fixture
async def endpoints() -> AsyncIterator[tuple[str, str, Any]]:
    gpu = SimGpu(("0",), refresh_seconds=0.1)
    sim = await run_sim_server("127.0.0.1", 0, SimModelConfig(tokens_per_second=400), gpu)
    service = await start_proxy(sim.url, meter=SimMeter(gpu))
    yield f"{sim.url}/v1", f"http://127.0.0.1:{service.public_port}/v1", service
    await service.stop()
    await sim.close()


def _summary_of_stream(chunks: list[Any]) -> dict[str, Any]:
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage is not None]
    return {"text": text, "finish": finish, "usage": [(u.prompt_tokens, u.completion_tokens) for u in usage]}


def _sync_calls(base_url: str, include_usage: bool | None) -> dict[str, Any]:
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="sim-llm", messages=MESSAGES, max_tokens=20)
    completion = raw.parse()
    kwargs: dict[str, Any] = {}
    if include_usage is not None:
        kwargs["stream_options"] = {"include_usage": include_usage}
    chunks = list(client.chat.completions.create(model="sim-llm", messages=MESSAGES, max_tokens=12, stream=True, **kwargs))
    return {
        "text": completion.choices[0].message.content,
        "finish": completion.choices[0].finish_reason,
        "usage": (completion.usage.prompt_tokens, completion.usage.completion_tokens),
        "headers": dict(raw.headers),
        "stream": _summary_of_stream(chunks),
        "stream_usage_extra": [c.usage.model_extra for c in chunks if c.usage is not None],
    }


@pytest.mark.parametrize("include_usage", [None, False, True])
async def test_sync_client_same_answers_plus_figures(endpoints, include_usage) -> None:
    direct_url, proxied_url, _ = endpoints
    direct = await asyncio.to_thread(_sync_calls, direct_url, include_usage)
    proxied = await asyncio.to_thread(_sync_calls, proxied_url, include_usage)
    for key in ("text", "finish", "usage", "stream"):
        assert proxied[key] == direct[key], key
    if include_usage:
        assert len(proxied["stream"]["usage"]) == 1
        emissions = proxied["stream_usage_extra"][0]["emissions"]
        assert emissions["energy_joules"] > 0 and emissions["co2e_grams"] > emissions["co2e_embodied_grams"] > 0
        assert emissions["basis"].startswith("meter=sim; intensity=constant; pue=1.2")
    else:
        assert proxied["stream"]["usage"] == []  # usage only when asked
    headers = {k.lower(): v for k, v in proxied["headers"].items()}
    for name in ("x-energy-joules", "x-co2e-grams", "x-co2e-embodied-grams", "x-carbon-intensity", "carbon-emissions-scope-2", "x-emissions-basis", "x-request-id"):
        assert name in headers, name
    assert float(headers["x-energy-joules"]) > 0
    assert float(headers["x-carbon-intensity"]) == pytest.approx(450.0)
    assert float(headers["x-co2e-grams"]) == pytest.approx(
        float(headers["carbon-emissions-scope-2"]) + float(headers["x-co2e-embodied-grams"]), rel=1e-4
    )


async def test_async_client_streaming_and_completions(endpoints) -> None:
    direct_url, proxied_url, service = endpoints
    results = []
    for base_url in (direct_url, proxied_url):
        client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0)
        stream = await client.chat.completions.create(
            model="sim-llm", messages=MESSAGES, max_tokens=15, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        completion = await client.completions.create(model="sim-llm", prompt="The SCI score is", max_tokens=7)
        embedding = await client.embeddings.create(model="sim-llm", input="hello")
        results.append(
            (_summary_of_stream(chunks), completion.choices[0].text, completion.usage.completion_tokens, embedding.usage.prompt_tokens)
        )
        await client.close()
    assert results[0] == results[1]


async def test_receipt_of_a_stream_is_readable_by_its_credential_only(endpoints) -> None:
    _, proxied_url, service = endpoints
    client = openai.AsyncOpenAI(base_url=proxied_url, api_key="sk-owner", max_retries=0)
    async with client.chat.completions.with_streaming_response.create(model="sim-llm", messages=MESSAGES, max_tokens=5, stream=True) as response:
        request_id = response.headers["x-request-id"]
        async for _ in response.iter_lines():
            pass
    await client.close()
    await asyncio.sleep(0.3)  # the meter covers the end; the receipt settles
    import aiohttp

    url = proxied_url.removesuffix("/v1") + f"/carbon-proxy/v1/receipts/{request_id}"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Authorization": "Bearer sk-owner"}) as ok:
            receipt = await ok.json()
            assert ok.status == 200
        async with session.get(url, headers={"Authorization": "Bearer sk-other"}) as other:
            assert other.status == 404
        async with session.get(url) as anonymous:
            assert anonymous.status == 401
    assert receipt["request_id"] == request_id and receipt["output_tokens"] == 5
    assert receipt["status"] == "final" and receipt["energy_joules"] > 0
    assert "sk-owner" not in str(receipt) and "credential_hash" not in receipt
