"""OpenAI-compatible APIs (vLLM, TGI /v1, llama.cpp server, Ollama /v1, LiteLLM...).

Streams: the proxy asks for `stream_options.include_usage` to get exact token counts,
and when the client did not ask for it, hides the usage-only chunk again and strips the
`"usage":null` the server then adds to every chunk.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.dialects.base import (
    Dialect,
    RequestInfo,
    ResponseReader,
    TokenTick,
    as_int,
    estimate_tokens_from_text,
    parse_json_object,
)
from proxy.dialects.chunks import bears_content, content_events
from proxy.dialects.framing import SseReader, event_data
from proxy.dialects.json_splice import with_include_usage

_USAGE = b'"usage":'
_NULL_USAGE_VARIANTS = (b',"usage":null', b', "usage": null', b'"usage":null,', b'"usage": null, ')
_NULL_USAGE = _NULL_USAGE_VARIANTS[0]
_NULL_USAGE_END = b',"usage":null}\n\n'
"""How vLLM and most servers end every chunk once usage was asked for (compact JSON)."""

# Endpoints whose streams carry tokens. Other paths (models list, files...) are generic.
_GENERATION_PATHS = ("/chat/completions", "/completions")


def _strip_null_usage(data: bytes) -> bytes:
    for variant in _NULL_USAGE_VARIANTS:
        if variant in data:
            return data.replace(variant, b"", 1)
    return data


def cached_prompt_tokens(usage: dict[str, Any]) -> int | None:
    """Prefix-cache hits: `prompt_tokens_details.cached_tokens` (OpenAI; vLLM with
    --enable-prompt-tokens-details; SGLang with --enable-cache-report; llama.cpp's
    llama-server), or `input_tokens_details` (OpenAI Responses API)."""
    for key in ("prompt_tokens_details", "input_tokens_details"):
        details = usage.get(key)
        if isinstance(details, dict):
            cached = as_int(details.get("cached_tokens"))
            if cached is not None:
                return cached
    return None


class OpenAISseReader(SseReader):
    slow_markers = (_USAGE, b"[DONE]")  # the common marker first: one scan per chunk

    def __init__(self, info: RequestInfo, tick: TokenTick) -> None:
        super().__init__(info, tick)
        self._usage_chunk: dict[str, Any] | None = None

    def _marked(self, ready: bytes, now: float) -> bytes:
        # Fast path for the chunks every stream is made of once the proxy asked for usage:
        # n events, each a single line `data:...,"usage":null}` and a blank line, with no
        # CR and no other "usage" or "data:" in them. on_event would take each for a token
        # that only carries usage:null (and strip it if the client did not ask for usage);
        # this does the same in a few scans of the bytes.
        if ready.endswith(_NULL_USAGE_END) and ready.startswith(b"data:") and b"\r" not in ready:
            if ready.find(b"\n") == len(ready) - 2:
                n = 1  # one event: its terminator holds the only newlines
            else:
                n = ready.count(_NULL_USAGE_END)
                if ready.count(b"\n") != 2 * n or ready.count(b"\n\ndata:") != n - 1:
                    return self._slow(ready, now)
            if ready.count(b'"usage"') == n and ready.count(b"data:") == n:
                if not self.info.client_wants_usage:
                    out = ready.replace(_NULL_USAGE, b"")
                elif b"\\u" not in ready:  # no escaped key could hide a second "usage" from the count
                    out = ready
                else:
                    return self._slow(ready, now)
                tokens = self.count_tokens(ready)
                if tokens:
                    self.work.streamed_tokens += tokens
                    self.tick(tokens, now)
                return out
        return self._slow(ready, now)

    def count_tokens(self, ready: bytes) -> int:
        # Role-only, empty and finish-only chunks are not tokens (servers that ignore
        # include_usage leave this count as the receipt's).
        return content_events(ready)

    def on_data(self, data: bytes, now: float) -> None:
        if bears_content(data):
            super().on_data(data, now)

    def on_event(self, event: bytes, now: float) -> bytes | None:
        data = event_data(event)
        if data is None or _USAGE not in data:
            return super().on_event(event, now)
        if not self.info.client_wants_usage and data.lstrip()[:1] == b"{":  # never edit what is not a JSON object
            stripped = _strip_null_usage(data)
            if stripped is not data:  # a normal chunk that only carries "usage":null
                self.on_data(stripped, now)
                return event.replace(data, stripped, 1)
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return super().on_event(event, now)
        usage = chunk.get("usage") if isinstance(chunk, dict) else None
        if not isinstance(usage, dict):
            return super().on_event(event, now)
        self._read_usage(usage)
        if isinstance(chunk.get("id"), str):
            self.work.response_id = chunk["id"]
        choices = chunk.get("choices")
        if choices:
            self.on_data(data, now)
            if self.info.client_wants_usage:
                # Usage rode on a content chunk (vLLM's continuous_usage_stats puts it on
                # every one): never hold content; the figures go in a comment, or in a
                # usage-only chunk if one follows.
                return event
            # Pass the content, hide the usage.
            del chunk["usage"]
            return b"data: " + orjson.dumps(chunk) + b"\n\n"
        # Hold the usage chunk: it is the last one, and it may carry the figures. Were
        # there a second, the first goes out where the second came (nothing is dropped).
        previous, self._usage_chunk = self._usage_chunk, chunk
        if previous is not None and self.info.client_wants_usage:
            return b"data: " + orjson.dumps(previous) + b"\n\n"
        return None

    def release_held(self) -> bytes:
        chunk, self._usage_chunk = self._usage_chunk, None
        lead = b"data: " + orjson.dumps(chunk) + b"\n\n" if chunk is not None and self.info.client_wants_usage else b""
        return lead + super().release_held()

    def _read_usage(self, usage: dict[str, Any]) -> None:
        self.work.prompt_tokens = as_int(usage.get("prompt_tokens"))
        self.work.output_tokens = as_int(usage.get("completion_tokens", usage.get("output_tokens")))
        self.work.cached_tokens = cached_prompt_tokens(usage)


    def tail(self, figures: dict[str, Any] | None) -> bytes:
        chunk = self._usage_chunk
        if chunk is None or not self.info.client_wants_usage:
            return super().tail(figures)
        if figures is not None:
            chunk["usage"]["emissions"] = figures
        return b"data: " + orjson.dumps(chunk) + b"\n\n" + super().tail(None)


class OpenAIJsonReader(ResponseReader):
    def read_json(self, data: dict[str, Any]) -> None:
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.work.prompt_tokens = as_int(usage.get("prompt_tokens", usage.get("input_tokens")))
            self.work.output_tokens = as_int(usage.get("completion_tokens", usage.get("output_tokens"))) or 0
            self.work.cached_tokens = cached_prompt_tokens(usage)
        if isinstance(data.get("id"), str):
            self.work.response_id = data["id"]
        choices = data.get("choices")
        if isinstance(choices, list):
            reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict)]
            self.work.finish_reasons = tuple(r for r in reasons if isinstance(r, str))


class OpenAIDialect(Dialect):
    name = "openai"

    def inspect_request(self, method: str, path: str, body: bytes | None) -> RequestInfo:
        data = parse_json_object(body)
        info = RequestInfo(body=body)
        if data is None:
            return info
        model = data.get("model")
        info.model = model if isinstance(model, str) else None
        info.prompt_tokens_estimate = estimate_tokens_from_text(len(body or b""))
        info.stream = data.get("stream") is True
        if info.stream and path.endswith(_GENERATION_PATHS) and body is not None:
            options = data.get("stream_options")
            info.client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
            # Ask for usage by inserting bytes only (numbers, key order, duplicates stay the
            # client's); a client that chose include_usage either way is left as it is.
            rewritten = with_include_usage(body, data)
            if rewritten is not None:
                info.body = rewritten
        return info

    def reader(self, info: RequestInfo, content_type: str, tick: TokenTick) -> ResponseReader:
        if content_type.startswith("text/event-stream"):
            return OpenAISseReader(info, tick)
        return OpenAIJsonReader(info, tick)
