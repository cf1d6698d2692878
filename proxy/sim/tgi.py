"""Text Generation Inference's native API: POST /generate and /generate_stream.

/generate answers `{"generated_text": ...}` (plus `details` when asked) with TGI's
timing and token headers (x-prompt-tokens, x-generated-tokens, ...). /generate_stream
sends `data:{...}` events, one per token; the last carries `generated_text` and, when
asked, `details` with `generated_tokens` and `input_length`.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy.sim.engine import SimSequence, plan_output
from proxy.sim.state import SIM_STATE, SimState, connection_watch
from proxy.sim.streaming import BodyWriter, bad_request, json_response, read_json, send_now, start_stream
from proxy.sim.text import (
    FIRST_TOKEN_TEXT, TOKEN_ID_BASE, TOKEN_TEXT, VOCABULARY_SIZE, count_text_tokens, natural_length, text_seed,
)  # fmt: skip

COMPUTE_TYPE = "gpu+optimized"


def _token(position: int, index: int) -> dict[str, Any]:
    text = FIRST_TOKEN_TEXT[index] if position == 0 else TOKEN_TEXT[index]
    return {"id": TOKEN_ID_BASE + index, "text": text, "logprob": _logprob(index), "special": False}


def _logprob(index: int) -> float:
    return -0.05 - (index % 17) * 0.11


# Pre-encoded token objects for the stream's hot path, first position and later ones.
_TOKEN_BYTES = tuple(orjson.dumps(_token(1, i)) for i in range(VOCABULARY_SIZE))
_FIRST_TOKEN_BYTES = tuple(orjson.dumps(_token(0, i)) for i in range(VOCABULARY_SIZE))


def _finish_reason(seq: SimSequence) -> str:
    return "length" if seq.finish_reason == "length" else "eos_token"


class TgiStreamSink:
    __slots__ = ("_writer", "_details", "_seed")

    def __init__(self, writer: BodyWriter, details: bool, seed: int | None) -> None:
        self._writer = writer
        self._details = details
        self._seed = seed

    def on_token(self, seq: SimSequence, position: int, index: int) -> None:
        if position + 1 >= seq.target_tokens:
            return  # the last token goes out with generated_text, in on_finish
        token = _FIRST_TOKEN_BYTES[index] if position == 0 else _TOKEN_BYTES[index]
        self._writer.write(b'data:{"index":%d,"token":%b,"generated_text":null,"details":null}\n\n' % (position + 1, token))

    def on_finish(self, seq: SimSequence) -> None:
        if not seq.token_indices:
            return
        position = len(seq.token_indices) - 1
        details = None
        if self._details:
            details = {"finish_reason": _finish_reason(seq), "generated_tokens": seq.generated_tokens,
                       "seed": self._seed, "input_length": seq.prompt_tokens}
        event = {"index": position + 1, "token": _token(position, seq.token_indices[-1]),
                 "generated_text": seq.text, "details": details}
        self._writer.write(b"data:" + orjson.dumps(event) + b"\n\n")


def _parameters(body: dict[str, Any], state: SimState) -> tuple[str, int, bool, bool, int | None]:
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise bad_request("'inputs' must be a string")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request("'parameters' must be an object")
    max_new_tokens = parameters.get("max_new_tokens")
    if max_new_tokens is None:
        max_new_tokens = state.config.tgi_default_max_new_tokens
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise web.HTTPUnprocessableEntity(
            text=orjson.dumps({"error": "`max_new_tokens` must be strictly positive", "error_type": "validation"}).decode(),
            content_type="application/json",
        )
    seed = parameters.get("seed") if isinstance(parameters.get("seed"), int) else None
    return (inputs, max_new_tokens, bool(parameters.get("details")),
            bool(parameters.get("decoder_input_details")), seed)


async def generate(request: web.Request) -> web.StreamResponse:
    return await _serve(request, stream=False)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    return await _serve(request, stream=True)


async def _serve(request: web.Request, *, stream: bool) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    config = state.config
    body = await read_json(request)
    inputs, max_new_tokens, details, input_details, seed = _parameters(body, state)
    prompt_tokens = count_text_tokens(inputs)
    text_key = text_seed(inputs, config.seed)
    target, finish_reason = plan_output(natural_length(text_key, config.natural_tokens_min,
                                                       config.natural_tokens_max), max_new_tokens)
    target = max(1, target)  # TGI always generates at least one token
    async with state.request(request) as ticket:
        seq = SimSequence(ticket.request_id, prompt_tokens, target, finish_reason, text_key,
                          connection_lost=connection_watch(request))
        response: web.StreamResponse | None = None
        if stream:
            headers = {"x-compute-type": COMPUTE_TYPE, "x-compute-characters": str(len(inputs)),
                       "X-Accel-Buffering": "no"}
            response, writer = await start_stream(request, "text/event-stream", ticket.request_id, headers)
            seq.sink = TgiStreamSink(writer, details, seed)
        finished = await state.generate(ticket, seq, response)
        if finished is not None:
            return finished
        result: dict[str, Any] = {"generated_text": seq.text}
        if details or input_details:
            prefill = []
            if input_details:
                prefill = [{"id": TOKEN_ID_BASE + i % VOCABULARY_SIZE, "text": "", "logprob": None}
                           for i in range(prompt_tokens)]
            result["details"] = {
                "finish_reason": _finish_reason(seq),
                "generated_tokens": seq.generated_tokens,
                "seed": seed,
                "prefill": prefill,
                "tokens": [_token(p, i) for p, i in enumerate(seq.token_indices)],
            }
        return await send_now(request, json_response(result, ticket.request_id, headers=_timing_headers(seq, len(inputs))))


def _timing_headers(seq: SimSequence, characters: int) -> dict[str, str]:
    end = seq.finished_seconds or seq.arrival_seconds
    start = seq.admitted_seconds if seq.admitted_seconds is not None else end
    total = end - seq.arrival_seconds
    inference = end - start
    per_token = inference / max(1, seq.generated_tokens)
    return {
        "x-compute-type": COMPUTE_TYPE,
        "x-compute-time": repr(total),
        "x-compute-characters": str(characters),
        "x-total-time": str(int(total * 1000)),
        "x-validation-time": "0",
        "x-queue-time": str(int((start - seq.arrival_seconds) * 1000)),
        "x-inference-time": str(int(inference * 1000)),
        "x-time-per-token": str(int(per_token * 1000)),
        "x-prompt-tokens": str(seq.prompt_tokens),
        "x-generated-tokens": str(seq.generated_tokens),
    }
