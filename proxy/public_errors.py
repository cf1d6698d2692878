"""aiohttp's own error answers on the public listener, made JSON and quiet.

Requests aiohttp's parser rejects (a control byte in a header, a line over 8190 bytes,
a bad request target) and exceptions that escape the handler are answered by
`RequestHandler.handle_error`: a plain-text page that quotes the offending bytes (maybe a
credential) and a full traceback in the log, per request. Here they get the data path's
JSON error instead, and one rate-limited log line that names the kind of error only.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from proxy.forward import json_error
from proxy.header_guard import RateLimitedLog

log = logging.getLogger("carbon_proxy")
_log_rejected = RateLimitedLog(log)


def _describe(status: int, exc: BaseException | None) -> tuple[str, str]:
    """(error type, message) for a client; never the bytes it sent."""
    if status >= 500:
        return "internal_error", "the proxy failed to answer this request"
    if isinstance(exc, http_exceptions.LineTooLong):
        return "request_header_too_large", "the request line or a header is too long"
    if isinstance(exc, http_exceptions.InvalidURLError):
        return "invalid_request_target", "the request target is not a valid path"
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return "invalid_method", "the request method is not valid"
    if isinstance(exc, http_exceptions.InvalidHeader):
        return "invalid_header", "a header name or value is not valid"
    return "bad_request", "the request is not valid HTTP/1.1"


class JsonErrorRequestHandler(RequestHandler):  # type: ignore[misc]
    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        kind, text = _describe(status, exc)
        _log_rejected(logging.WARNING if status < 500 else logging.ERROR, "public listener answered %d %s (%s)", status, kind, type(exc).__name__)
        if request.writer.output_size > 0:
            # Part of an answer went out already: the connection is broken (aiohttp's rule).
            raise ConnectionError("response already started; cannot send an error")
        response = json_error(status, kind, text)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """web.Server whose connections answer protocol errors with JSON (see module doc)."""

    def __call__(self) -> RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return JsonErrorRequestHandler(self, loop=self._loop, **kwargs)
