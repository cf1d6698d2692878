"""Writing streamed bodies from the scheduler loop, and the bits every dialect shares."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter


class BodyWriter:
    """Synchronous writes of a prepared streaming response, straight to its transport.

    aiohttp's `await response.write()` cannot be called from the scheduler loop for
    thousands of streams (one slow client's drain would stall all of them), so the
    scheduler writes HTTP/1.1 chunk frames to the transport itself; the transport buffers
    for slow readers. `await response.write_eof()` then ends the body as usual.
    """

    __slots__ = ("_transport", "_chunked")

    def __init__(self, request: web.Request, writer: AbstractStreamWriter | None) -> None:
        # The transport outlives nothing: once the client is gone it reports is_closing().
        self._transport = request.transport
        self._chunked = bool(getattr(writer, "chunked", False))

    def write(self, data: bytes) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        if self._chunked:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            transport.write(data)
        return True

    def write3(self, head: bytes, middle: bytes, tail: bytes) -> bool:
        """write(head + middle + tail) with one allocation: the per-token hot path."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        if self._chunked:
            size = len(head) + len(middle) + len(tail)
            transport.write(b"%x\r\n%b%b%b\r\n" % (size, head, middle, tail))
        else:
            transport.write(b"%b%b%b" % (head, middle, tail))
        return True


async def start_stream(request: web.Request, content_type: str, request_id: str,
                       extra_headers: dict[str, str] | None = None) -> tuple[web.StreamResponse, BodyWriter]:
    headers = {"Content-Type": content_type, "Cache-Control": "no-cache", "X-Request-Id": request_id}
    if extra_headers:
        headers.update(extra_headers)
    response = web.StreamResponse(status=200, headers=headers)
    writer = await response.prepare(request)
    return response, BodyWriter(request, writer)


async def end_stream(response: web.StreamResponse) -> None:
    """Terminate the body; a client that already left is not an error."""
    try:
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass


def json_response(body: Any, request_id: str, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    all_headers = {"X-Request-Id": request_id}
    if headers:
        all_headers.update(headers)
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json",
                        headers=all_headers)


async def send_now(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send a complete response before returning, so the request departs after its last byte."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass
    return response


async def read_json(request: web.Request) -> dict[str, Any]:
    """The JSON object body, or a 400 with an OpenAI-style error."""
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def bad_request(message: str, param: str | None = None) -> web.HTTPBadRequest:
    error = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return web.HTTPBadRequest(text=orjson.dumps(error).decode(), content_type="application/json")


def optional_int(body: dict[str, Any], *names: str, minimum: int = 0) -> int | None:
    """The first of these fields that is set, as an int >= minimum (400 otherwise)."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise bad_request(f"'{name}' must be an integer >= {minimum}", param=name)
        return value
    return None


_iso_cache: tuple[int, str] = (0, "")


def iso_now() -> str:
    """UTC RFC 3339 time with microseconds and a Z, as Ollama writes it (cached per ms)."""
    global _iso_cache
    now = time.time()
    millis = int(now * 1000)
    if _iso_cache[0] != millis:
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        _iso_cache = (millis, stamp)
    return _iso_cache[1]


def nanoseconds(seconds: float | None) -> int:
    return max(0, int(round((seconds or 0.0) * 1e9)))
