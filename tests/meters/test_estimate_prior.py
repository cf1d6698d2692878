"""Issue 12 item 5: the estimate meter never reports 0 J for a request that did work.

Seen in front of a real llama.cpp engine: 5 of the first 6 non-streaming answers said
`X-Energy-Joules: 0`, because the modelled energy reached the meter only after the
figure at the end of the response was computed. Here the upstream is a local server
answering like llama-cpp-python (usage in the body), with an unknown model name.
"""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web
from helpers import start_proxy, start_upstream

from proxy.errors import ConfigError
from proxy.meters.estimate import EstimateMeter, ecologits_joules_per_output_token, params_billions_from_name


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", 8.0),
        ("qwen2.5:0.5b", 0.5),
        ("Llama-3-70B", 70.0),
        ("gemma-2-27b-it", 27.0),
        ("Mixtral-8x7B-v0.1", 7.0),
        ("llama3.2:1b-instruct-q4_0", 1.0),
        ("gpt-4o", None),
        ("/models/tiny.gguf", None),
        ("bert-base", None),
    ],
)
def test_the_size_a_model_name_states(name: str, billions: float | None) -> None:
    assert params_billions_from_name(name) == billions


def test_unknown_models_get_the_stated_prior() -> None:
    meter = EstimateMeter(["0"], params_b=1.5)
    assert meter.active_params_billions("my-finetune") == 1.5
    assert meter.active_params_billions("my-finetune-70b") == 70.0  # the name says more than the prior
    assert meter.modelled_joules(2, 0, 10, "my-finetune") == pytest.approx(2 * 10 * ecologits_joules_per_output_token(1.5))
    with pytest.raises(ConfigError, match="meter.estimate.params_b"):
        EstimateMeter(["0"], params_b=0)


async def _answer(request: web.Request) -> web.Response:
    body = await request.json()
    n = int(body.get("max_tokens", 16))
    return web.json_response(
        {
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * n}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 22, "completion_tokens": n, "total_tokens": 22 + n},
        }
    )


async def test_every_non_streaming_answer_states_energy_from_the_first() -> None:
    runner, url = await start_upstream({"/v1/chat/completions": _answer})
    meter = EstimateMeter(["0"])
    service = await start_proxy(url, meter=meter)
    try:
        async with aiohttp.ClientSession() as session:
            figures = []
            for _ in range(6):
                async with session.post(
                    f"http://127.0.0.1:{service.public_port}/v1/chat/completions",
                    json={"model": "/models/tiny.gguf", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10},
                ) as response:
                    assert response.status == 200
                    figures.append((float(response.headers["X-Energy-Joules"]), response.headers["X-Emissions-Basis"]))
        expected = 10 * ecologits_joules_per_output_token(8.0)  # no size in the name: the 8 B prior
        for joules, basis in figures:
            assert joules >= expected * 0.999
            assert "meter=estimate; method=estimated" in basis
    finally:
        await service.stop()
        await runner.cleanup()


async def _stream(request: web.Request) -> web.StreamResponse:
    """llama-cpp-python's SSE: content chunks, then no usage unless asked."""
    body = await request.json()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(int(body.get("max_tokens", 16))):
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": body["model"], "choices": [{"index": 0, "delta": {"content": "x"}}]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def test_every_stream_states_energy_from_the_first() -> None:
    runner, url = await start_upstream({"/v1/chat/completions": _stream})
    service = await start_proxy(url, meter=EstimateMeter(["0"]))
    try:
        async with aiohttp.ClientSession() as session:
            figures = []
            for _ in range(4):
                async with session.post(
                    f"http://127.0.0.1:{service.public_port}/v1/chat/completions",
                    json={"model": "/models/tiny.gguf", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True},
                ) as response:
                    assert response.status == 200
                    text = (await response.read()).decode()
                (line,) = [line for line in text.split("\n") if line.startswith(": emissions ")]
                figures.append(json.loads(line[len(": emissions ") :]))
        expected = 10 * ecologits_joules_per_output_token(8.0)  # ten content chunks, the 8 B prior
        for emissions in figures:
            assert emissions["energy_joules"] >= expected * 0.999
            assert "method=estimated" in emissions["basis"]
    finally:
        await service.stop()
        await runner.cleanup()
