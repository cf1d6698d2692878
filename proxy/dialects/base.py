"""What a dialect is: it reads work units from a request and its response, and places
the proxy's figures where the stream format allows. It never changes the bytes the
client would get otherwise, besides those figures.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

# Called for output tokens seen in a stream: (count, monotonic time).
TokenTick = Callable[[int, float], None]


def _ignore_tick(count: int, at: float) -> None:
    return None


@dataclass(slots=True)
class Work:
    """What a request did, as far as the wire tells. Exact totals override estimates."""

    prompt_tokens: int | None = None
    output_tokens: int | None = None
    """Exact count from usage/details when the server reports one."""
    cached_tokens: int | None = None
    """Prompt tokens the server served from its prefix cache (inside prompt_tokens):
    no prefill work was done for them."""
    streamed_tokens: int = 0
    """Tokens counted as chunks passed (timing; may differ from the exact count)."""
    work_units: float | None = None
    """Non-token work (diffusion: images x steps x megapixels)."""
    images: int = 0
    prefill_seconds: float | None = None
    """Server-reported prompt processing time (Ollama, llama.cpp), when given."""
    decode_seconds: float | None = None
    unparsed: bool = False
    """The stream outgrew the event cap and passed through unread from there: the counts
    stop where reading stopped, and the figures say so (`tokens=estimated`)."""
    response_id: str | None = None
    """The server's id for the response, where the dialect reads one (telemetry)."""
    finish_reasons: tuple[str, ...] = ()
    """Why each choice stopped, where the dialect reads them (telemetry)."""

    def output_tokens_best(self) -> int:
        return self.output_tokens if self.output_tokens is not None else self.streamed_tokens

    def computed_prompt_tokens(self, prompt_tokens: int | None) -> int | None:
        """The prompt tokens the server actually prefilled: cached ones did no work."""
        if prompt_tokens is None or not self.cached_tokens:
            return prompt_tokens
        return max(0, prompt_tokens - self.cached_tokens)


@dataclass(slots=True)
class RequestInfo:
    """What a dialect learned from the request body."""

    model: str | None = None
    stream: bool = False
    client_wants_usage: bool = True
    """False when the proxy itself asked for usage and must hide it again."""
    prompt_tokens_estimate: int = 0
    work_units: float | None = None
    body: bytes | None = None
    """The body to send upstream (rewritten when the dialect asked for usage)."""
    extra: dict[str, Any] = field(default_factory=dict)


DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
"""Largest SSE event or NDJSON line a stream reader holds while waiting for its end
(`server.max_event_bytes`): beyond it the stream passes through unparsed."""


class ResponseReader:
    """Reads one response. Subclasses override what they need; the default reads nothing."""

    streaming: bool = False
    """True when the body is an incremental stream the reader follows (SSE, NDJSON)."""
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES

    def __init__(self, info: RequestInfo, tick: TokenTick = _ignore_tick) -> None:
        self.info = info
        self.work = Work(prompt_tokens=None, work_units=info.work_units)
        self.tick = tick

    def feed(self, chunk: bytes, now: float) -> bytes:
        """Bytes to forward now; may hold back an incomplete or final event."""
        return chunk

    def end(self) -> None:
        """The upstream stream ended; flush what parsing can still learn."""
        return None

    def tail(self, figures: dict[str, Any] | None) -> bytes:
        """Bytes to send after the stream: held events plus the figures, if any."""
        return b""

    def read_body(self, body: bytes, content_encoding: str | None) -> None:
        """A complete non-streaming body."""
        data = decode_json_body(body, content_encoding)
        if isinstance(data, dict):
            self.read_json(data)

    def read_json(self, data: dict[str, Any]) -> None:
        return None


def decode_json_body(body: bytes, content_encoding: str | None) -> Any:
    """Parse a JSON body for reading only; None when it is not JSON we can decode."""
    try:
        if content_encoding and content_encoding.lower() in ("gzip", "deflate", "x-gzip"):
            body = zlib.decompress(body, wbits=47)  # 32+15: gzip or zlib header, auto-detected
        elif content_encoding and content_encoding.lower() != "identity":
            return None
        return orjson.loads(body)
    except (orjson.JSONDecodeError, zlib.error, ValueError):
        return None


def parse_json_object(body: bytes | None) -> dict[str, Any] | None:
    """A JSON object from a request body or an event, or None (not JSON, not an object)."""
    if not body:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def estimate_tokens_from_text(text_bytes: int) -> int:
    # ~4 bytes of English per token: only a placeholder until the server's usage arrives.
    return max(1, text_bytes // 4)


MAX_COUNT = 10**9
"""No single request has a billion tokens: larger counts are garbage and are ignored, so a
hostile upstream cannot push infinities into attribution."""


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_COUNT else None
    if isinstance(value, float) and 0 <= value <= MAX_COUNT:
        return int(value)
    return None


class Dialect:
    """Base dialect: unknown API, work = elapsed time."""

    name = "generic"

    def inspect_request(self, method: str, path: str, body: bytes | None) -> RequestInfo:
        data = parse_json_object(body)
        info = RequestInfo(body=body)
        if data is not None:
            model = data.get("model")
            info.model = model if isinstance(model, str) else None
            info.stream = data.get("stream") is True
        return info

    def reader(self, info: RequestInfo, content_type: str, tick: TokenTick) -> ResponseReader:
        from proxy.dialects.framing import SseReader

        if content_type.startswith("text/event-stream"):
            return SseReader(info, tick)
        return ResponseReader(info, tick)
