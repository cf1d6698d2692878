"""Header rules of a transparent proxy (RFC 9110 section 7.6) and of our own figures."""

from __future__ import annotations

import os
import re
from typing import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 7.6.1: never forwarded, plus whatever the Connection header lists.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)

# Figures only the proxy may state: dropped from requests and from upstream responses,
# so neither a client nor a model server can spoof them.
EMISSIONS_HEADERS = frozenset(
    h.lower()
    for h in (
        "X-Energy-Joules",
        "X-CO2e-Grams",
        "X-CO2e-Embodied-Grams",
        "X-Carbon-Intensity",
        "Carbon-Emissions-Scope-2",
        "X-Emissions-Basis",
        "X-CO2e-Budget-Remaining",
        "X-Carbon-Receipt-Id",
        "X-Carbon-Route",
    )
)

# Set by the proxy for the upstream; the client's copies are replaced.
FORWARDING_HEADERS = frozenset(("host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "content-length"))

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


_ALWAYS_DROPPED = HOP_BY_HOP | EMISSIONS_HEADERS
# The batch runner's internal header (proxy.batches.sender) never leaves the proxy.
_UPSTREAM_DROPPED = _ALWAYS_DROPPED | FORWARDING_HEADERS | {"x-request-id", "x-carbon-proxy-batch"}
_REFRAMED_DROPPED = _ALWAYS_DROPPED | {"content-length"}


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()) if hasattr(headers, "getall") else [headers.get("Connection", "")]:
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _filtered(headers: CIMultiDictProxy[str] | CIMultiDict[str], dropped: frozenset[str]) -> CIMultiDict[str]:
    """`headers` without the (lower-case) names in `dropped` and those Connection lists."""
    # Per request: the drop sets are built once; the Connection header's tokens only when
    # there is one (multidicts look names up case-insensitively).
    if not hasattr(headers, "getall") or "Connection" in headers:
        dropped = dropped | _connection_tokens(headers)
    return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in dropped])


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    client_ip: str | None,
    scheme: str,
    request_id: str,
    trust_forwarded: bool,
) -> CIMultiDict[str]:
    """Headers to send upstream. Host is left out so the client library sets the upstream's own."""
    out = _filtered(incoming, _UPSTREAM_DROPPED)
    chain = incoming.get("X-Forwarded-For") if trust_forwarded else None
    if client_ip:
        out["X-Forwarded-For"] = f"{chain}, {client_ip}" if chain else client_ip
    out["X-Forwarded-Proto"] = (incoming.get("X-Forwarded-Proto") if trust_forwarded else None) or scheme
    if "Host" in incoming:
        out["X-Forwarded-Host"] = incoming["Host"]
    out["X-Request-Id"] = request_id
    return out


def client_response_headers(upstream: CIMultiDictProxy[str], *, reframed: bool) -> CIMultiDict[str]:
    """Headers to send the client. `reframed`: the proxy sets the length itself (or streams chunked)."""
    return _filtered(upstream, _REFRAMED_DROPPED if reframed else _ALWAYS_DROPPED)


# Version 4 and RFC 4122 variant bits, set as uuid.UUID(bytes=..., version=4) sets them.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET = (4 << 76) | (0x8000 << 48)
_random_pool = b""
_random_at = 0


def new_request_id() -> str:
    """What uuid.uuid4().hex gives (random, version 4), from a pool of os.urandom bytes:
    one system call per 256 ids instead of one per request."""
    global _random_pool, _random_at
    at = _random_at
    if at >= len(_random_pool):
        _random_pool, at = os.urandom(4096), 0
    _random_at = at + 16
    return "%032x" % (int.from_bytes(_random_pool[at : at + 16], "big") & _UUID4_CLEAR | _UUID4_SET)


def _drop_random_pool() -> None:
    global _random_pool, _random_at
    _random_pool, _random_at = b"", 0


os.register_at_fork(after_in_child=_drop_random_pool)  # a forked child never repeats its parent's ids


def request_id_from(headers: Mapping[str, str]) -> str:
    """The client's X-Request-Id when it is sane (no injection, bounded), else a new one."""
    given = headers.get("X-Request-Id")
    if given and _SANE_REQUEST_ID.fullmatch(given):  # match() lets "id\n" through ($)
        return given
    return new_request_id()
