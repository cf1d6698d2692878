"""The proxy in front of a real llama.cpp engine (llama-cpp-python's OpenAI server, a tiny
random-weight model), driven by the official `openai` client and by raw HTTP.

What a user checks: the text is the engine's own (greedy decoding, so the same prompt
gives the same answer direct and through the proxy), the only bytes added are the
documented figures, and the receipt's token counts are the engine's.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
from helpers import start_proxy

from proxy.meters.estimate import EstimateMeter
from proxy.receipts.model import Receipt
from proxy.serve import Service

from .engine import LlamaServer

MAX_TOKENS = 10
CHAT = [{"role": "user", "content": "Say something about the grid."}]
PROMPT = "The carbon intensity of the grid"


_clients: list[openai.AsyncOpenAI] = []


@pytest.fixture
async def proxy(llama_server: LlamaServer) -> AsyncIterator[Service]:
    # No GPU here: the default meter `auto` falls back to `estimate`, as for the user who
    # reported issue 12's 0 J answers.
    service = await start_proxy(llama_server.url, meter=EstimateMeter(["0"]))
    yield service
    while _clients:
        await _clients.pop().close()
    await service.stop()


def _client(base: str) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="sk-local", max_retries=0)
    _clients.append(client)  # closed by the fixture, on this test's event loop
    return client


def _proxy_url(service: Service) -> str:
    return f"http://127.0.0.1:{service.public_port}"


async def _receipt(service: Service, request_id: str, ready: Any = lambda r: True) -> Receipt:
    for _ in range(200):
        receipt = await service.proxy.receipts.get(request_id)
        if receipt is not None and ready(receipt):
            return receipt
        await asyncio.sleep(0.025)
    raise AssertionError(f"no receipt for {request_id} in the expected state: {receipt}")


async def _chat(client: openai.AsyncOpenAI, messages: list[dict[str, str]] = CHAT) -> Any:
    return await client.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=messages, max_tokens=MAX_TOKENS, temperature=0, seed=1
    )


async def test_non_streaming_answers_are_the_engines_with_its_counts_and_energy_from_the_first(
    llama_server: LlamaServer, proxy: Service
) -> None:
    direct, proxied = _client(llama_server.url), _client(_proxy_url(proxy))
    for turn in range(6):
        messages = [{"role": "user", "content": f"Question {turn}: what is a watt?"}]
        expected = (await _chat(direct, messages)).parse()
        raw = await _chat(proxied, messages)
        answer = raw.parse()
        assert answer.choices[0].message.content == expected.choices[0].message.content
        assert answer.choices[0].finish_reason == expected.choices[0].finish_reason == "length"
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
            expected.usage.prompt_tokens,
            expected.usage.completion_tokens,
        )
        # Issue 12: every answer states energy, the first included.
        assert float(raw.headers["X-Energy-Joules"]) > 0, turn
        assert "meter=estimate; method=estimated" in raw.headers["X-Emissions-Basis"]
        assert "tokens=estimated" not in raw.headers["X-Emissions-Basis"]  # the engine's own usage
        receipt = await _receipt(proxy, raw.headers["X-Carbon-Receipt-Id"])
        assert (receipt.prompt_tokens, receipt.output_tokens) == (answer.usage.prompt_tokens, answer.usage.completion_tokens)
        assert receipt.energy_joules > 0

    completion = await proxied.completions.with_raw_response.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    expected_completion = await direct.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert completion.parse().choices[0].text == expected_completion.choices[0].text
    receipt = await _receipt(proxy, completion.headers["X-Carbon-Receipt-Id"])
    assert receipt.prompt_tokens == expected_completion.usage.prompt_tokens
    assert receipt.output_tokens == expected_completion.usage.completion_tokens == MAX_TOKENS


async def _stream_chat(client: openai.AsyncOpenAI, include_usage: bool | None) -> tuple[list[Any], str | None]:
    kwargs: dict[str, Any] = {}
    if include_usage is not None:
        kwargs["stream_options"] = {"include_usage": include_usage}
    raw = await client.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, seed=1, stream=True, **kwargs
    )
    stream = raw.parse()
    return [chunk async for chunk in stream], raw.headers.get("X-Carbon-Receipt-Id")


def _summary(chunks: list[Any]) -> dict[str, Any]:
    return {
        "text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        "finish": [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason],
        "usage": [c.usage for c in chunks if c.usage is not None],
        "content_chunks": sum(1 for c in chunks if c.choices and c.choices[0].delta.content),
    }


@pytest.mark.parametrize("include_usage", [None, False, True])
async def test_streams_are_the_engines_and_count_the_tokens_generated(
    llama_server: LlamaServer, proxy: Service, include_usage: bool | None
) -> None:
    direct_chunks, _ = await _stream_chat(_client(llama_server.url), include_usage)
    proxied_chunks, request_id = await _stream_chat(_client(_proxy_url(proxy)), include_usage)
    direct, proxied = _summary(direct_chunks), _summary(proxied_chunks)
    assert proxied == direct
    assert direct["usage"] == []  # llama-cpp-python ignores include_usage: nothing to hide or add
    assert direct["finish"] == ["length"] and direct["content_chunks"] == MAX_TOKENS
    assert len(direct_chunks) == MAX_TOKENS + 2  # the role-only first and finish-only last are not tokens
    assert request_id is not None
    receipt = await _receipt(proxy, request_id, lambda r: r.prompt_tokens is not None)
    assert receipt.output_tokens == MAX_TOKENS  # issue 14: 12 were counted before
    assert "tokens=estimated" in receipt.basis  # counted by the proxy, not reported by the engine
    assert receipt.energy_joules > 0


async def test_a_streamed_completion_gets_its_prompt_count_from_the_engines_tokenizer(
    llama_server: LlamaServer, proxy: Service
) -> None:
    expected = await _client(llama_server.url).completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    raw = await _client(_proxy_url(proxy)).completions.with_raw_response.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    text = "".join([chunk.choices[0].text async for chunk in raw.parse() if chunk.choices])
    assert text == expected.choices[0].text
    # The count comes from /extras/tokenize after the response, off its path.
    receipt = await _receipt(proxy, raw.headers["X-Carbon-Receipt-Id"], lambda r: r.prompt_tokens == expected.usage.prompt_tokens)
    assert receipt.output_tokens == expected.usage.completion_tokens == MAX_TOKENS


_VOLATILE = re.compile(rb'"(id|created)": ?("[^"]*"|\d+)')


def _normalized(body: bytes) -> bytes:
    # The engine gives every answer a fresh id and timestamp; nothing else may differ.
    return _VOLATILE.sub(rb'"\1": X', body)


async def test_raw_stream_bytes_are_the_engines_plus_the_emissions_comment(llama_server: LlamaServer, proxy: Service) -> None:
    body = {"model": "tiny-llama", "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(llama_server.url + "/v1/chat/completions", json=body) as response:
            direct = await response.read()
            direct_type = response.headers["Content-Type"]
        async with session.post(_proxy_url(proxy) + "/v1/chat/completions", json=body) as response:
            proxied = await response.read()
            assert response.headers["Content-Type"] == direct_type
    comment = re.search(rb": emissions \{[^\n]*\}\n\n", proxied)
    assert comment is not None
    without = proxied[: comment.start()] + proxied[comment.end() :]
    assert _normalized(without) == _normalized(direct)
    assert proxied[comment.end() :] == b"data: [DONE]\r\n\r\n" or proxied[comment.end() :].startswith(b"data: [DONE]")


async def test_a_client_that_leaves_mid_stream_gets_a_receipt_and_the_engine_stays_usable(
    llama_server: LlamaServer, proxy: Service
) -> None:
    body = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 200, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(_proxy_url(proxy) + "/v1/chat/completions", json=body)
        request_id = response.headers["X-Carbon-Receipt-Id"]
        seen = 0
        async for line in response.content:
            if line.startswith(b"data: ") and b'"content"' in line:
                seen += 1
                if seen == 3:
                    break
        response.close()  # drop the connection mid-stream
    receipt = await _receipt(proxy, request_id, lambda r: r.outcome != "ok")
    assert receipt.outcome == "client_disconnected"
    assert 3 <= (receipt.output_tokens or 0) <= 200
    # The engine and the proxy serve the next request normally.
    answer = (await _chat(_client(_proxy_url(proxy)))).parse()
    assert answer.choices[0].finish_reason == "length"


async def test_concurrent_requests_each_get_their_own_answer_and_counts(llama_server: LlamaServer, proxy: Service) -> None:
    prompts = [[{"role": "user", "content": f"Topic {i}: energy"}] for i in range(6)]
    direct = _client(llama_server.url)
    expected = [(await _chat(direct, messages)).parse().choices[0].message.content for messages in prompts]
    proxied = _client(_proxy_url(proxy))

    async def one(i: int) -> tuple[str, str]:
        if i % 2:
            raw = await _chat(proxied, prompts[i])
            return raw.parse().choices[0].message.content or "", raw.headers["X-Carbon-Receipt-Id"]
        raw = await proxied.chat.completions.with_raw_response.create(
            model="tiny-llama", messages=prompts[i], max_tokens=MAX_TOKENS, temperature=0, seed=1, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
        return text, raw.headers["X-Carbon-Receipt-Id"]

    results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    assert [text for text, _ in results] == expected
    assert len({request_id for _, request_id in results}) == len(prompts)
    for _, request_id in results:
        receipt = await _receipt(proxy, request_id)
        assert receipt.output_tokens == MAX_TOKENS and receipt.outcome == "ok"
