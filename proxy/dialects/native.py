"""Native APIs of TGI, Ollama and llama.cpp: where each puts its token counts."""

from __future__ import annotations

from typing import Any


from proxy.dialects.base import Dialect, RequestInfo, ResponseReader, TokenTick, as_int, estimate_tokens_from_text, parse_json_object
from proxy.dialects.framing import NdjsonReader, SseReader

_NS_PER_S = 1e9


# -- TGI: details.generated_tokens; x-prompt-tokens / x-generated-tokens headers ---------


def _read_tgi(work: Any, data: dict[str, Any]) -> None:
    details = data.get("details")
    if isinstance(details, dict):
        generated = as_int(details.get("generated_tokens"))
        if generated is not None:
            work.output_tokens = generated
        prefill = details.get("prefill")
        if isinstance(prefill, list) and prefill:
            work.prompt_tokens = len(prefill)
        # TGI >= 2.0 states the prompt size in the last stream event's details.
        input_length = as_int(details.get("input_length"))
        if input_length is not None:
            work.prompt_tokens = input_length


class TgiJsonReader(ResponseReader):
    def read_json(self, data: dict[str, Any]) -> None:
        _read_tgi(self.work, data)


class TgiSseReader(SseReader):
    # The last event carries `details` (generated_text non-null); TGI sends no [DONE].
    slow_markers = (b"[DONE]", b'"details":{')

    def on_data(self, data: bytes, now: float) -> None:
        if b'"details":{' in data:
            parsed = parse_json_object(data)
            if parsed is not None:
                _read_tgi(self.work, parsed)
        super().on_data(data, now)


class TgiDialect(Dialect):
    name = "tgi"

    def inspect_request(self, method: str, path: str, body: bytes | None) -> RequestInfo:
        info = super().inspect_request(method, path, body)
        info.stream = path.endswith("/generate_stream") or info.stream
        info.prompt_tokens_estimate = estimate_tokens_from_text(len(body or b""))
        return info

    def reader(self, info: RequestInfo, content_type: str, tick: TokenTick) -> ResponseReader:
        if content_type.startswith("text/event-stream"):
            return TgiSseReader(info, tick)
        return TgiJsonReader(info, tick)


def read_tgi_headers(work: Any, headers: Any) -> None:
    """TGI reports counts in response headers on /generate."""
    prompt = headers.get("x-prompt-tokens")
    generated = headers.get("x-generated-tokens")
    if prompt and prompt.isdigit():
        work.prompt_tokens = int(prompt)
    if generated and generated.isdigit():
        work.output_tokens = int(generated)


# -- Ollama: prompt_eval_count, eval_count, durations in ns ---------------------------


def _read_ollama(work: Any, data: dict[str, Any]) -> None:
    work.prompt_tokens = as_int(data.get("prompt_eval_count"))
    work.output_tokens = as_int(data.get("eval_count"))
    prompt_ns = as_int(data.get("prompt_eval_duration"))
    eval_ns = as_int(data.get("eval_duration"))
    if prompt_ns is not None:
        work.prefill_seconds = prompt_ns / _NS_PER_S
    if eval_ns is not None:
        work.decode_seconds = eval_ns / _NS_PER_S


class OllamaNdjsonReader(NdjsonReader):
    def read_json(self, data: dict[str, Any]) -> None:
        _read_ollama(self.work, data)


class OllamaJsonReader(ResponseReader):
    def read_json(self, data: dict[str, Any]) -> None:
        _read_ollama(self.work, data)


class OllamaDialect(Dialect):
    name = "ollama"

    def inspect_request(self, method: str, path: str, body: bytes | None) -> RequestInfo:
        info = super().inspect_request(method, path, body)
        data = parse_json_object(body)
        # Ollama streams unless told otherwise.
        info.stream = data is not None and data.get("stream", True) is not False and path.startswith("/api/")
        info.prompt_tokens_estimate = estimate_tokens_from_text(len(body or b""))
        return info

    def reader(self, info: RequestInfo, content_type: str, tick: TokenTick) -> ResponseReader:
        if content_type.startswith("application/x-ndjson"):
            return OllamaNdjsonReader(info, tick)
        return OllamaJsonReader(info, tick)


# -- llama.cpp server: timings.prompt_n, timings.predicted_n ------------------------


def _read_llamacpp(work: Any, data: dict[str, Any]) -> None:
    # llama-server (tools/server): timings.prompt_n = prompt tokens evaluated, cache_n =
    # those reused from the slot's KV cache (no prefill work), tokens_evaluated = the whole
    # prompt. `tokens_cached` is NOT a cache hit count (it is n_past: prompt + generated).
    timings = data.get("timings")
    total = as_int(data.get("tokens_evaluated"))
    if isinstance(timings, dict):
        computed = as_int(timings.get("prompt_n"))
        cached = as_int(timings.get("cache_n"))
        if cached is None and computed is not None and total is not None and total >= computed:
            cached = total - computed
        if total is None and computed is not None:
            total = computed + (cached or 0)
        work.prompt_tokens = total
        work.cached_tokens = cached
        work.output_tokens = as_int(timings.get("predicted_n"))
        prompt_ms = timings.get("prompt_ms")
        predicted_ms = timings.get("predicted_ms")
        if isinstance(prompt_ms, (int, float)):
            work.prefill_seconds = prompt_ms / 1000.0
        if isinstance(predicted_ms, (int, float)):
            work.decode_seconds = predicted_ms / 1000.0
        return
    # Older servers: tokens_evaluated / tokens_predicted at top level.
    if "tokens_predicted" in data:
        work.prompt_tokens = total
        work.output_tokens = as_int(data.get("tokens_predicted"))


class LlamaCppSseReader(SseReader):
    slow_markers = (b"[DONE]", b'"timings":{', b'"tokens_predicted"')

    def on_data(self, data: bytes, now: float) -> None:
        if b'"stop":true' in data or b'"timings":{' in data:
            parsed = parse_json_object(data)
            if parsed is not None and parsed.get("stop") is True:
                _read_llamacpp(self.work, parsed)
                return  # the final event carries no new token
        super().on_data(data, now)


class LlamaCppJsonReader(ResponseReader):
    def read_json(self, data: dict[str, Any]) -> None:
        _read_llamacpp(self.work, data)


class LlamaCppDialect(Dialect):
    name = "llamacpp"

    def inspect_request(self, method: str, path: str, body: bytes | None) -> RequestInfo:
        info = super().inspect_request(method, path, body)
        info.prompt_tokens_estimate = estimate_tokens_from_text(len(body or b""))
        return info

    def reader(self, info: RequestInfo, content_type: str, tick: TokenTick) -> ResponseReader:
        if content_type.startswith("text/event-stream"):
            return LlamaCppSseReader(info, tick)
        return LlamaCppJsonReader(info, tick)
