"""Token counts where the server sends no usage: which chunks are tokens, and the
server's own tokenizer for the prompt (proxy.tokenize)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from helpers import start_upstream

from proxy.dialects.chunks import bears_content, content_events
from proxy.tokenize import PromptCounter, prompt_text


@pytest.mark.parametrize(
    ("chunk", "is_token"),
    [
        (b'{"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}', False),
        (b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}', False),
        (b'{"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}', False),
        (b'{"choices":[{"delta":{"role":null,"content":null,"reasoning_content":null,"tool_calls":null}}]}', False),
        (b'{"choices":[{"delta":{"content":"x"}}]}', True),
        (b'{"choices": [{"delta": {"content": " "}}]}', True),
        (b'{"choices":[{"delta":{"content":"!"},"finish_reason":"stop"}]}', True),  # vLLM: last token with the finish
        (b'{"choices":[{"text":"a","index":0}]}', True),
        (b'{"choices":[{"text":"","finish_reason":"length"}]}', False),
        (b'{"choices":[{"delta":{"reasoning_content":"hm"}}]}', True),
        (b'{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}', True),
        (b'{"error": {"message": "boom", "type": "InternalServerError", "code": 500}}', False),
    ],
)
def test_which_chunks_are_tokens(chunk: bytes, is_token: bool) -> None:
    assert bears_content(chunk) is is_token
    assert content_events(b"data: " + chunk + b"\n\n") == int(is_token)


def test_prompt_text_of_completions_and_chats() -> None:
    assert prompt_text({"prompt": "abc"}) == "abc"
    assert prompt_text({"inputs": "abc"}) == "abc"
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "u"}]}]}
    assert prompt_text(chat) == "s\nu"
    assert prompt_text({"model": "m"}) is None


async def _count(counter: PromptCounter, url: str, dialect: str, body: dict[str, Any]) -> int | None:
    result: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    started = counter.count_later(url, dialect, json.dumps(body).encode(), None, result.set_result)
    if not started:
        return None
    try:
        return await asyncio.wait_for(asyncio.shield(result), 2)
    except asyncio.TimeoutError:
        return None


async def test_each_servers_tokenize_answer_is_read_and_the_working_endpoint_remembered() -> None:
    calls: list[str] = []

    async def llama_server(request: web.Request) -> web.Response:
        calls.append(request.path)
        body = await request.json()
        return web.json_response({"tokens": list(range(len(body["content"])))})

    async def tgi(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response([{"id": i, "text": c} for i, c in enumerate(body["inputs"])])

    async def none(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(status=404)

    counter = PromptCounter()
    llama_runner, llama_url = await start_upstream({"/tokenize": llama_server, "/extras/tokenize": none})
    tgi_runner, tgi_url = await start_upstream({"/tokenize": tgi})
    bare_runner, bare_url = await start_upstream({"/tokenize": none, "/extras/tokenize": none})
    try:
        assert await _count(counter, llama_url, "openai", {"prompt": "abcd"}) == 4  # llama-server's /tokenize
        assert await _count(counter, llama_url, "openai", {"prompt": "abcdef"}) == 6
        assert calls == ["/tokenize", "/tokenize"]  # remembered: /extras/tokenize never tried
        assert await _count(counter, tgi_url, "tgi", {"inputs": "abc"}) == 3
        calls.clear()
        assert await _count(counter, bare_url, "openai", {"prompt": "abc"}) is None
        assert calls == ["/tokenize", "/extras/tokenize"]
        # No tokenize endpoint there: never asked again (the counts stay estimated).
        assert await _count(counter, bare_url, "openai", {"prompt": "abc"}) is None
        assert calls == ["/tokenize", "/extras/tokenize"]
        assert await _count(counter, llama_url, "ollama", {"prompt": "abc"}) is None  # Ollama has none
    finally:
        await counter.close()
        for runner in (llama_runner, tgi_runner, bare_runner):
            await runner.cleanup()
