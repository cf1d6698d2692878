"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
from typing import Any

from aiohttp import web

from proxy.sim.engine import SimSequence, plan_output
from proxy.sim.openai_stream import OpenAIStreamSink, ResponseHead, complete_body
from proxy.sim.state import SIM_STATE, SimState, connection_watch
from proxy.sim.streaming import (
    bad_request, json_response, optional_int, read_json, send_now, start_stream,
)  # fmt: skip
from proxy.sim.text import WordStream, count_chat_tokens, count_text_tokens, natural_length, text_seed


def _model(body: dict[str, Any], state: SimState) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else state.config.model


def _check_single_choice(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n not in (None, 1):
        raise bad_request("the simulated server supports only n=1", param="n")


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") is True
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return stream, include_usage


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    body = await read_json(request)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", param="messages")
    try:
        prompt_tokens, prompt_text = count_chat_tokens(messages)
    except ValueError as exc:
        raise bad_request(str(exc), param="messages") from None
    _check_single_choice(body)
    max_tokens = optional_int(body, "max_completion_tokens", "max_tokens", minimum=1)
    stream, include_usage = _stream_flags(body)
    return await _serve_text(request, state, body, chat=True, prompt_text=prompt_text,
                             prompt_tokens=prompt_tokens, max_tokens=max_tokens, stream=stream,
                             include_usage=include_usage)


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    body = await read_json(request)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompt_text, prompt_tokens = " ".join(map(str, prompt)), len(prompt)
    elif isinstance(prompt, str):
        prompt_text, prompt_tokens = prompt, count_text_tokens(prompt)
    else:
        raise bad_request("'prompt' must be a string (or one string, or one token array)", param="prompt")
    _check_single_choice(body)
    max_tokens = optional_int(body, "max_tokens", minimum=0)
    if max_tokens is None:
        max_tokens = state.config.completions_default_max_tokens
    stream, include_usage = _stream_flags(body)
    return await _serve_text(request, state, body, chat=False, prompt_text=prompt_text,
                             prompt_tokens=prompt_tokens, max_tokens=max_tokens, stream=stream,
                             include_usage=include_usage)


async def _serve_text(
    request: web.Request, state: SimState, body: dict[str, Any], *, chat: bool, prompt_text: str,
    prompt_tokens: int, max_tokens: int | None, stream: bool, include_usage: bool,
) -> web.StreamResponse:  # fmt: skip
    config = state.config
    seed = text_seed(prompt_text, config.seed)
    target, finish_reason = plan_output(natural_length(seed, config.natural_tokens_min, config.natural_tokens_max), max_tokens)
    head = ResponseHead(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], int(time.time()),
                        _model(body, state), config.system_fingerprint, chat)
    async with state.request(request) as ticket:
        seq = SimSequence(ticket.request_id, prompt_tokens, target, finish_reason, seed,
                          connection_lost=connection_watch(request))
        response: web.StreamResponse | None = None
        if stream:
            response, writer = await start_stream(request, "text/event-stream; charset=utf-8", ticket.request_id)
            seq.sink = OpenAIStreamSink(writer, head, include_usage)
        finished = await state.generate(ticket, seq, response)
        if finished is not None:
            return finished
        return await send_now(request, json_response(complete_body(head, seq), ticket.request_id))


def _embedding_inputs(value: Any) -> list[tuple[str, int]]:
    """(text, tokens) per input: a string, strings, a token array or token arrays."""
    if isinstance(value, str):
        return [(value, count_text_tokens(value))]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [(" ".join(map(str, value)), len(value))]
        items: list[tuple[str, int]] = []
        for item in value:
            if isinstance(item, str):
                items.append((item, count_text_tokens(item)))
            elif isinstance(item, list) and all(isinstance(v, int) for v in item):
                items.append((" ".join(map(str, item)), len(item)))
            else:
                raise bad_request("'input' items must be strings or token arrays", param="input")
        return items
    raise bad_request("'input' must be a string, an array of strings or token arrays", param="input")


def _embedding_vector(text: str, seed: int, dimensions: int) -> list[float]:
    words = WordStream(text_seed(text, seed))
    raw = [words.next_index() / 50.0 - 1.0 for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


async def embeddings(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    config = state.config
    body = await read_json(request)
    inputs = _embedding_inputs(body.get("input"))
    dimensions = optional_int(body, "dimensions", minimum=1) or config.embedding_dimensions
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    prompt_tokens = sum(tokens for _, tokens in inputs)
    async with state.request(request) as ticket:
        # Embedding is prompt work only: a sequence that prefills and produces nothing.
        seq = SimSequence(ticket.request_id, prompt_tokens, 0, "stop", 0,
                          connection_lost=connection_watch(request))
        await state.scheduler.generate(seq)
        ticket.prompt_tokens = prompt_tokens
        if seq.cancelled:
            ticket.outcome = "cancelled"
            return web.Response(status=499)
        data = []
        for index, (text, _) in enumerate(inputs):
            vector = _embedding_vector(text, config.seed, dimensions)
            embedding: Any = vector
            if encoding == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        result = {
            "object": "list",
            "data": data,
            "model": _model(body, state),
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return await send_now(request, json_response(result, ticket.request_id))


async def list_models(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    model = {"id": state.config.model, "object": "model", "created": 1_700_000_000, "owned_by": "carbon-proxy-sim"}
    return web.json_response({"object": "list", "data": [model]})
