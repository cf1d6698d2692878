"""Endpoints the proxy answers itself on the public listener (receipts, the Batch API).

They are written against this small, server-agnostic interface rather than aiohttp's
request type, so the public HTTP server can change without touching them: the server
reads the (bounded) body, builds a LocalRequest, awaits the handler and writes the
LocalResponse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping

import orjson

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class LocalRequest:
    method: str
    path: str
    """The decoded path, without the query string."""
    query: Mapping[str, str]
    headers: Mapping[str, str]
    """Case-insensitive (a multidict)."""
    body: bytes
    credential_hash: str | None
    """sha256 of the caller's credential (proxy.tenants), None when it sent none."""
    tenant: str


@dataclass(slots=True)
class LocalResponse:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


LocalHandler = Callable[[LocalRequest], Awaitable[LocalResponse]]


@dataclass(frozen=True, slots=True)
class LocalEndpoint:
    prefix: str
    """Requests whose path equals or starts with this are answered by `handler`."""
    handler: LocalHandler
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def json_response(status: int, data: object, headers: dict[str, str] | None = None) -> LocalResponse:
    return LocalResponse(status, orjson.dumps(data), headers=dict(headers or {}))


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> LocalResponse:
    """The same OpenAI-style error body as proxy.forward.json_error."""
    return json_response(status, {"error": {"message": message, "type": kind, "code": status}}, headers)
