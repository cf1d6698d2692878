"""Ollama's native API: POST /api/generate and /api/chat (NDJSON streams by default)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy.sim.engine import SimSequence, plan_output
from proxy.sim.state import SIM_STATE, connection_watch
from proxy.sim.streaming import (
    BodyWriter, bad_request, iso_now, json_response, nanoseconds, read_json, send_now, start_stream,
)  # fmt: skip
from proxy.sim.text import TOKEN_ID_BASE, count_chat_tokens, count_text_tokens, natural_length, text_seed, token_json


def final_fields(seq: SimSequence, model: str, chat: bool, content: str) -> dict[str, Any]:
    """The `done: true` object: counts and durations in nanoseconds, as Ollama reports them."""
    end = seq.finished_seconds or seq.arrival_seconds
    admitted = seq.admitted_seconds if seq.admitted_seconds is not None else end
    first = seq.first_token_seconds if seq.first_token_seconds is not None else end
    body: dict[str, Any] = {"model": model, "created_at": iso_now()}
    if chat:
        body["message"] = {"role": "assistant", "content": content}
    else:
        body["response"] = content
    body["done"] = True
    body["done_reason"] = "length" if seq.finish_reason == "length" else "stop"
    if not chat:
        # Deprecated but still sent: the conversation's token ids.
        body["context"] = [TOKEN_ID_BASE + i for i in range(seq.prompt_tokens)] + [
            TOKEN_ID_BASE + i for i in seq.token_indices
        ]
    body.update(
        total_duration=nanoseconds(end - seq.arrival_seconds),
        load_duration=nanoseconds(admitted - seq.arrival_seconds),  # waiting for the runner
        prompt_eval_count=seq.prompt_tokens,
        prompt_eval_duration=nanoseconds(first - admitted),
        eval_count=seq.generated_tokens,
        eval_duration=nanoseconds(end - first),
    )
    return body


class OllamaStreamSink:
    __slots__ = ("_writer", "_model", "_chat", "_prefix", "_middle", "_suffix")

    def __init__(self, writer: BodyWriter, model: str, chat: bool) -> None:
        self._writer = writer
        self._model = model
        self._chat = chat
        self._prefix = b'{"model":' + orjson.dumps(model) + b',"created_at":"'
        if chat:
            self._middle = b'","message":{"role":"assistant","content":'
            self._suffix = b'},"done":false}\n'
        else:
            self._middle = b'","response":'
            self._suffix = b',"done":false}\n'

    def on_token(self, seq: SimSequence, position: int, index: int) -> None:
        head = self._prefix + iso_now().encode() + self._middle
        self._writer.write3(head, token_json(position, index), self._suffix)

    def on_finish(self, seq: SimSequence) -> None:
        self._writer.write(orjson.dumps(final_fields(seq, self._model, self._chat, "")) + b"\n")


def _num_predict(body: dict[str, Any]) -> int | None:
    options = body.get("options")
    value = options.get("num_predict") if isinstance(options, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request("options.num_predict must be an integer")
    return value if value >= 0 else None  # -1: unlimited, -2: fill the context


async def generate(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    prompt = body.get("prompt", "")
    system = body.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise bad_request("'prompt' and 'system' must be strings")
    if not prompt and not body.get("images"):
        # Ollama answers an empty prompt by just loading the model.
        state = request.app[SIM_STATE]
        model = body.get("model") or state.config.model
        loaded = {"model": model, "created_at": iso_now(), "response": "", "done": True, "done_reason": "load"}
        return web.json_response(loaded)
    tokens = count_text_tokens(system + prompt) if system else count_text_tokens(prompt)
    return await _serve(request, body, chat=False, prompt_text=system + prompt, prompt_tokens=tokens)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("'messages' must be an array")
    try:
        tokens, text = count_chat_tokens(messages)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    return await _serve(request, body, chat=True, prompt_text=text, prompt_tokens=tokens)


async def _serve(request: web.Request, body: dict[str, Any], *, chat: bool, prompt_text: str,
                 prompt_tokens: int) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    config = state.config
    model = body.get("model") if isinstance(body.get("model"), str) else config.model
    stream = body.get("stream", True) is not False  # Ollama streams unless told not to
    seed = text_seed(prompt_text, config.seed)
    natural = natural_length(seed, config.natural_tokens_min, config.natural_tokens_max)
    target, finish_reason = plan_output(natural, _num_predict(body))
    async with state.request(request) as ticket:
        seq = SimSequence(ticket.request_id, prompt_tokens, target, finish_reason, seed,
                          connection_lost=connection_watch(request))
        response: web.StreamResponse | None = None
        if stream:
            response, writer = await start_stream(request, "application/x-ndjson", ticket.request_id)
            seq.sink = OllamaStreamSink(writer, model, chat)
        finished = await state.generate(ticket, seq, response)
        if finished is not None:
            return finished
        return await send_now(request, json_response(final_fields(seq, model, chat, seq.text), ticket.request_id))


async def tags(request: web.Request) -> web.StreamResponse:
    config = request.app[SIM_STATE].config
    model = {
        "name": config.model, "model": config.model, "modified_at": "2024-01-01T00:00:00Z", "size": 0,
        "digest": "sim", "details": {"format": "gguf", "family": "sim", "parameter_size": "8B"},
    }  # fmt: skip
    return web.json_response({"models": [model]})
