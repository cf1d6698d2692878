"""Prompt token counts from the server's own tokenizer, for servers that send no usage.

llama-cpp-python ignores `stream_options.include_usage`, so a stream's prompt size is
unknown at its end. The server can still say: vLLM (`POST /tokenize`, chat messages with
the template applied), llama.cpp's llama-server (`POST /tokenize`), TGI (`POST /tokenize`)
and llama-cpp-python (`POST /extras/tokenize`). This asks after the response is complete
(never on its path), learns per upstream which endpoint answers, and gives up quietly:
the receipt keeps the text estimate and its basis says `tokens=estimated`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable
from urllib.parse import urlsplit

import aiohttp
import orjson

from proxy.dialects.base import MAX_COUNT

log = logging.getLogger("carbon_proxy.tokenize")

TIMEOUT_SECONDS = 5.0
MAX_PENDING = 64
"""Counts in flight at once; past it a request keeps its estimate (bounded memory and load)."""

_ABSENT = (404, 405, 501)
"""Statuses that mean "this server has no such endpoint": try the next, remember."""


def prompt_text(data: dict[str, Any]) -> str | None:
    """The prompt as plain text: a completion's prompt, or a chat's message contents."""
    prompt = data.get("prompt", data.get("inputs"))
    if isinstance(prompt, str):
        return prompt
    messages = data.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "\n".join(parts)
    return None


def _candidates(dialect: str, data: dict[str, Any], text: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, body) per endpoint, in the order to try for an upstream of this dialect."""
    vllm: dict[str, Any] = {"model": data.get("model")} if isinstance(data.get("model"), str) else {}
    if isinstance(data.get("messages"), list):
        vllm["messages"] = data["messages"]
    else:
        vllm["prompt"] = text
    tgi = ("/tokenize", {"inputs": text})
    llamacpp = {"content": text, "add_special": True}
    if dialect == "tgi":
        return [tgi]
    if dialect == "llamacpp":
        return [("/tokenize", llamacpp)]
    if dialect != "openai":
        return []  # Ollama has no tokenize endpoint; diffusion has no tokens
    # One body both `/tokenize`s read: vLLM takes model + prompt/messages, llama-server
    # takes content (each ignores the other's keys); then llama-cpp-python's.
    return [("/tokenize", {**vllm, **llamacpp}), ("/extras/tokenize", {"input": text})]


def _count(answer: Any) -> int | None:
    if isinstance(answer, list):  # TGI: one object per token
        return len(answer)
    if isinstance(answer, dict):
        count = answer.get("count")
        if isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= MAX_COUNT:
            return count
        tokens = answer.get("tokens")
        if isinstance(tokens, list):
            return len(tokens)
    return None


class PromptCounter:
    """Counts prompts with the upstream's tokenizer, off the request path."""

    def __init__(self, timeout_seconds: float = TIMEOUT_SECONDS) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._working: dict[str, int] = {}
        """Per upstream origin: the index of the candidate that answered, or -1 for none."""
        self._tasks: set[asyncio.Task[None]] = set()

    def count_later(self, upstream_url: str, dialect: str, body: bytes | None, authorization: str | None, done: Callable[[int], None]) -> bool:
        """Start counting; `done(count)` is called with the count. False when not started."""
        if body is None or len(self._tasks) >= MAX_PENDING:
            return False
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        text = prompt_text(data) if isinstance(data, dict) else None
        if text is None:
            return False
        parts = urlsplit(upstream_url)
        origin = f"{parts.scheme}://{parts.netloc}"
        candidates = _candidates(dialect, data, text)
        known = self._working.get(origin)
        if known == -1 or not candidates:
            return False
        if known is not None:
            candidates = [candidates[known]] if known < len(candidates) else []
        task = asyncio.create_task(self._count(origin, text, candidates, known, authorization, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _count(
        self, origin: str, text: str, candidates: list[tuple[str, dict[str, Any]]], known: int | None, authorization: str | None, done: Callable[[int], None]
    ) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Content-Type": "application/json"}
        if authorization:
            headers["Authorization"] = authorization  # the client's own credential, never logged
        absent = 0
        for index, (path, body) in enumerate(candidates):
            try:
                async with self._session.post(origin + path, data=orjson.dumps(body), headers=headers) as response:
                    if response.status in _ABSENT:
                        absent += 1
                        continue
                    if response.status != 200:
                        continue
                    count = _count(orjson.loads(await response.read()))
            except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError, ValueError):
                continue
            if count is None or (count == 0 and text):
                continue  # an empty count for a non-empty prompt read the wrong key
            if known is None:
                self._working[origin] = index
            try:
                done(count)
            except Exception:
                log.exception("prompt count callback failed")
            return
        if known is None and absent == len(candidates):
            self._working[origin] = -1  # no tokenize endpoint here: stop asking
            log.info("upstream %s has no tokenize endpoint; prompt tokens of streams without usage stay estimated", origin)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
