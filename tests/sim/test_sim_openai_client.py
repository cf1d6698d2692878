"""The official OpenAI client, sync and async, against the sim server."""

from __future__ import annotations

import asyncio
import base64

import openai
import pytest

from proxy.sim import SimServer
from proxy.sim.text import natural_length, text_seed

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does a joule measure?"}]


def sync_client(server: SimServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sim", max_retries=0)


def async_client(server: SimServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="sim", max_retries=0)


async def test_sync_chat_non_streaming(sim_server: SimServer) -> None:
    def call() -> openai.types.chat.ChatCompletion:
        with sync_client(sim_server) as client:
            return client.chat.completions.create(model="sim-test", messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]

    completion = await asyncio.to_thread(call)
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.role == "assistant"
    assert len(completion.choices[0].message.content.split()) == 5  # type: ignore[union-attr]
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5
    again = await asyncio.to_thread(call)
    assert again.choices[0].message.content == completion.choices[0].message.content  # deterministic
    assert again.usage.prompt_tokens == completion.usage.prompt_tokens  # type: ignore[union-attr]


async def test_sync_chat_streaming_with_include_usage(sim_server: SimServer) -> None:
    def call() -> list[openai.types.chat.ChatCompletionChunk]:
        with sync_client(sim_server) as client:
            stream = client.chat.completions.create(
                model="sim-test", messages=MESSAGES, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
            )
            return list(stream)

    chunks = await asyncio.to_thread(call)
    *content_chunks, usage_chunk = chunks
    assert all(c.usage is None for c in content_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[-1].choices[0].finish_reason == "stop"  # no max_tokens: natural end
    tokens = [c for c in content_chunks if c.choices[0].delta.content]
    assert usage_chunk.usage.completion_tokens == len(tokens)
    assert 8 <= len(tokens) <= 24


async def test_async_chat_streaming_without_usage_and_non_streaming(sim_server: SimServer) -> None:
    async with async_client(sim_server) as client:
        stream = await client.chat.completions.create(model="sim-test", messages=MESSAGES, stream=True, max_tokens=6)  # type: ignore[arg-type]
        chunks = [chunk async for chunk in stream]
        whole = await client.chat.completions.create(model="sim-test", messages=MESSAGES, max_tokens=6)  # type: ignore[arg-type]
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content
    assert whole.usage is not None and whole.usage.completion_tokens == 6


def long_winded_prompt() -> str:
    """A prompt the sim would answer with more than 16 tokens if nothing cut it."""
    candidates = (f"Tell me about grid number {i}" for i in range(1000))
    return next(p for p in candidates if natural_length(text_seed(p, 0), 8, 24) > 16)  # conftest's config


async def test_legacy_completions_default_to_16_tokens(sim_server: SimServer) -> None:
    async with async_client(sim_server) as client:
        result = await client.completions.create(model="sim-test", prompt=long_winded_prompt())
        stream = await client.completions.create(
            model="sim-test", prompt="Say", max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert result.object == "text_completion"
    assert result.usage is not None and result.usage.completion_tokens == 16
    assert result.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-2].choices[0].finish_reason == "length"


async def test_embeddings_models_and_images(sim_server: SimServer) -> None:
    async with async_client(sim_server) as client:
        embedded = await client.embeddings.create(model="sim-embed", input=["one text", "another text"])
        models = await client.models.list()
        images = await client.images.generate(prompt="a wind farm", size="256x256", n=2, response_format="b64_json")
    assert [e.index for e in embedded.data] == [0, 1]
    assert len(embedded.data[0].embedding) == 64
    assert embedded.usage.prompt_tokens == embedded.usage.total_tokens > 0
    assert [m.id for m in models.data] == ["sim-test"]
    assert images.data is not None and len(images.data) == 2
    png = base64.b64decode(images.data[0].b64_json or "")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


async def test_bad_request_is_an_openai_error(sim_server: SimServer) -> None:
    async with async_client(sim_server) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="sim-test", messages=[])
    assert caught.value.status_code == 400
