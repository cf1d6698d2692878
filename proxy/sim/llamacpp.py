"""llama.cpp server's native API: POST /completion (and its alias /completions).

The answer carries `tokens_evaluated`/`tokens_predicted` and a `timings` object
(`prompt_n`, `predicted_n`, milliseconds and rates). With `"stream": true` it sends
`data: {...}` events with `"stop": false`, then a final event with `"stop": true`, empty
content and the timings; no `[DONE]` line.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy.sim.engine import SimSequence, plan_output
from proxy.sim.state import SIM_STATE, connection_watch
from proxy.sim.streaming import BodyWriter, bad_request, json_response, read_json, send_now, start_stream
from proxy.sim.text import count_text_tokens, natural_length, text_seed, token_json

SLOT_ID = 0


def _timings(seq: SimSequence) -> dict[str, float | int]:
    end = seq.finished_seconds or seq.arrival_seconds
    admitted = seq.admitted_seconds if seq.admitted_seconds is not None else end
    first = seq.first_token_seconds if seq.first_token_seconds is not None else end
    prompt_ms = (first - admitted) * 1000.0
    predicted_ms = (end - first) * 1000.0
    prompt_n, predicted_n = seq.prompt_tokens, seq.generated_tokens
    return {
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n * 1000.0 / prompt_ms if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": predicted_n * 1000.0 / predicted_ms if predicted_ms > 0 else 0.0,
    }


def final_body(seq: SimSequence, model: str, prompt: str, n_predict: int, content: str) -> dict[str, Any]:
    return {
        "index": 0,
        "content": content,
        "tokens": [],
        "id_slot": SLOT_ID,
        "stop": True,
        "model": model,
        "tokens_predicted": seq.generated_tokens,
        "tokens_evaluated": seq.prompt_tokens,
        "generation_settings": {"n_predict": n_predict, "seed": 4294967295, "temperature": 0.8,
                                "stream": False, "model": model},
        "prompt": prompt,
        "has_new_line": False,
        "truncated": False,
        "stop_type": "limit" if seq.finish_reason == "length" else "eos",
        "stopping_word": "",
        "tokens_cached": seq.prompt_tokens + seq.generated_tokens,
        "timings": _timings(seq),
    }


class LlamaCppStreamSink:
    __slots__ = ("_writer", "_model", "_prompt", "_n_predict", "_suffix", "_suffix_end")

    def __init__(self, writer: BodyWriter, model: str, prompt: str, n_predict: int, prompt_tokens: int) -> None:
        self._writer = writer
        self._model = model
        self._prompt = prompt
        self._n_predict = n_predict
        self._suffix = b',"tokens":[],"stop":false,"id_slot":%d,"tokens_predicted":' % SLOT_ID
        self._suffix_end = b',"tokens_evaluated":%d}\n\n' % prompt_tokens

    def on_token(self, seq: SimSequence, position: int, index: int) -> None:
        self._writer.write(b'data: {"index":0,"content":%b%b%d%b' % (
            token_json(position, index), self._suffix, position + 1, self._suffix_end))

    def on_finish(self, seq: SimSequence) -> None:
        body = final_body(seq, self._model, self._prompt, self._n_predict, "")
        self._writer.write(b"data: " + orjson.dumps(body) + b"\n\n")


async def completion(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    config = state.config
    body = await read_json(request)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        prompt_text, prompt_tokens = " ".join(map(str, prompt)), max(1, len(prompt))
    elif isinstance(prompt, str):
        prompt_text, prompt_tokens = prompt, count_text_tokens(prompt)
    else:
        raise bad_request("'prompt' must be a string or an array of token ids")
    n_predict = body.get("n_predict", -1)
    if isinstance(n_predict, bool) or not isinstance(n_predict, int):
        raise bad_request("'n_predict' must be an integer")
    model = body.get("model") if isinstance(body.get("model"), str) else config.model
    seed = text_seed(prompt_text, config.seed)
    natural = natural_length(seed, config.natural_tokens_min, config.natural_tokens_max)
    target, finish_reason = plan_output(natural, n_predict if n_predict >= 0 else None)
    async with state.request(request) as ticket:
        seq = SimSequence(ticket.request_id, prompt_tokens, target, finish_reason, seed,
                          connection_lost=connection_watch(request))
        response: web.StreamResponse | None = None
        if body.get("stream") is True:
            response, writer = await start_stream(request, "text/event-stream", ticket.request_id)
            seq.sink = LlamaCppStreamSink(writer, model, prompt_text, n_predict, prompt_tokens)
        finished = await state.generate(ticket, seq, response)
        if finished is not None:
            return finished
        return await send_now(request, json_response(final_body(seq, model, prompt_text, n_predict, seq.text),
                                                     ticket.request_id))


async def health(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})
