"""Wire shapes of every dialect, byte for byte where a parser depends on it."""

from __future__ import annotations

import re

import aiohttp
import orjson

from proxy.sim import SimServer


def sse_data(raw: str, prefix: str = "data: ") -> list[str]:
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith(prefix) for e in events), events[:3]
    return [e[len(prefix):] for e in events]


async def post(server: SimServer, path: str, body: dict, **headers: str) -> tuple[aiohttp.ClientResponse, str]:
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post(path, json=body, headers=headers) as response:
            return response, await response.text()


async def test_openai_sse_without_include_usage_has_no_usage_key(sim_server: SimServer) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
    response, raw = await post(sim_server, "/v1/chat/completions", body)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    *chunks, done = sse_data(raw)
    assert done == "[DONE]"
    parsed = [orjson.loads(c) for c in chunks]
    assert all("usage" not in c and c["object"] == "chat.completion.chunk" for c in parsed)
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [c["choices"][0]["finish_reason"] for c in parsed][-1] == "length"
    assert sum(1 for c in parsed if c["choices"][0]["delta"].get("content")) == 4


async def test_openai_sse_with_include_usage(sim_server: SimServer) -> None:
    body = {"model": "m", "prompt": "hi", "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}}
    _, raw = await post(sim_server, "/v1/completions", body)
    *chunks, done = sse_data(raw)
    parsed = [orjson.loads(c) for c in chunks]
    assert done == "[DONE]"
    assert all(c["usage"] is None for c in parsed[:-1])
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}


async def test_ollama_generate_streams_ndjson_with_final_counts(sim_server: SimServer) -> None:
    body = {"model": "llama3", "prompt": "Why is the sky blue?", "options": {"num_predict": 5}}
    response, raw = await post(sim_server, "/api/generate", body)
    assert response.headers["Content-Type"] == "application/x-ndjson"
    lines = [orjson.loads(line) for line in raw.splitlines()]
    assert [line["done"] for line in lines] == [False] * 5 + [True]
    final = lines[-1]
    assert final["done_reason"] == "length" and final["response"] == ""
    assert final["eval_count"] == 5 and final["prompt_eval_count"] == 5
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] >= 0
    assert final["total_duration"] >= final["eval_duration"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", final["created_at"])
    assert final["model"] == "llama3"


async def test_ollama_chat_non_streaming_is_one_object(sim_server: SimServer) -> None:
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    response, raw = await post(sim_server, "/api/chat", body)
    result = orjson.loads(raw)
    assert result["done"] is True and result["done_reason"] == "stop"
    assert result["message"]["role"] == "assistant"
    assert len(result["message"]["content"].split()) == result["eval_count"]


async def test_tgi_generate_headers_and_details(sim_server: SimServer) -> None:
    body = {"inputs": "What is Deep Learning?", "parameters": {"max_new_tokens": 4, "details": True}}
    response, raw = await post(sim_server, "/generate", body)
    result = orjson.loads(raw)
    assert result["details"]["generated_tokens"] == 4 and result["details"]["finish_reason"] == "length"
    assert len(result["details"]["tokens"]) == 4
    assert response.headers["x-generated-tokens"] == "4"
    assert response.headers["x-prompt-tokens"] == "6"
    for header in ("x-compute-time", "x-total-time", "x-queue-time", "x-inference-time", "x-time-per-token"):
        float(response.headers[header])
    _, raw = await post(sim_server, "/generate", {"inputs": "hi"})
    assert set(orjson.loads(raw)) == {"generated_text"}  # details only when asked


async def test_tgi_generate_stream_events(sim_server: SimServer) -> None:
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 3, "details": True}}
    response, raw = await post(sim_server, "/generate_stream", body)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = [orjson.loads(e) for e in sse_data(raw, prefix="data:")]
    assert [e["index"] for e in events] == [1, 2, 3]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 3, "seed": None, "input_length": 1}


async def test_llamacpp_completion_json_and_stream(sim_server: SimServer) -> None:
    _, raw = await post(sim_server, "/completion", {"prompt": "Building a website", "n_predict": 4})
    result = orjson.loads(raw)
    assert result["stop"] is True and result["stop_type"] == "limit"
    assert result["timings"]["prompt_n"] == result["tokens_evaluated"] == 5
    assert result["timings"]["predicted_n"] == result["tokens_predicted"] == 4
    _, raw = await post(sim_server, "/completion", {"prompt": "Building a website", "n_predict": 4, "stream": True})
    events = [orjson.loads(e) for e in sse_data(raw)]
    assert [e["stop"] for e in events] == [False] * 4 + [True]
    assert "".join(e["content"] for e in events) == result["content"]
    assert events[-1]["timings"]["predicted_n"] == 4


async def test_request_id_echo_ground_truth_metrics_and_health(sim_server: SimServer) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    response, _ = await post(sim_server, "/v1/chat/completions", body, **{"X-Request-Id": "abc-123"})
    assert response.headers["X-Request-Id"] == "abc-123"
    response, _ = await post(sim_server, "/v1/chat/completions", body, **{"X-Request-Id": "abc-123"})
    assert response.headers["X-Request-Id"] != "abc-123"  # ground truth is filed per id: no merging
    async with aiohttp.ClientSession(sim_server.url) as session:
        async with session.get("/sim/requests/abc-123") as truth_response:
            truth = await truth_response.json()
        async with session.get("/sim/requests/never-seen") as missing:
            assert missing.status == 404
        async with session.get("/metrics") as metrics_response:
            exposition = await metrics_response.text()
        async with session.get("/health") as health:
            assert health.status == 200
        async with session.get("/sim/stats") as stats_response:
            stats = await stats_response.json()
    assert truth["present"] is False and truth["total_joules"] > truth["dynamic_joules"] > 0
    assert sim_server.gpu.ground_truth_joules("abc-123") == truth["total_joules"]
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter" in exposition
    samples = re.findall(r'^DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION\{gpu="(\d)",UUID="GPU-sim-\1",.*\} (\d+)$',
                         exposition, re.MULTILINE)
    assert [gpu for gpu, _ in samples] == ["0", "1"] and all(int(mj) > 0 for _, mj in samples)
    assert stats["completed"] == 2 and stats["in_flight"] == 0 and stats["cancelled"] == 0


async def test_errors_are_clear(sim_server: SimServer) -> None:
    response, raw = await post(sim_server, "/v1/chat/completions", {"model": "m", "messages": "nope"})
    assert response.status == 400 and orjson.loads(raw)["error"]["param"] == "messages"
    response, raw = await post(sim_server, "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}})
    assert response.status == 422 and "max_new_tokens" in orjson.loads(raw)["error"]
    async with aiohttp.ClientSession(sim_server.url) as session:
        async with session.post("/v1/completions", data=b"{not json") as bad:
            assert bad.status == 400
    assert sim_server.stats.in_flight == 0 and sim_server.stats.completed == 0
