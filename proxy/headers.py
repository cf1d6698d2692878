"""Header rules of a transparent proxy (RFC 9110 section 7.6) and of our own figures."""

from __future__ import annotations

import re
import uuid
from typing import Iterable, Mapping

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
    )
)

# Set by the proxy for the upstream; the client's copies are replaced.
FORWARDING_HEADERS = frozenset(("host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "content-length"))

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()) if hasattr(headers, "getall") else [headers.get("Connection", "")]:
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _filtered(headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: Iterable[str]) -> CIMultiDict[str]:
    dropped = HOP_BY_HOP | EMISSIONS_HEADERS | frozenset(drop) | _connection_tokens(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in dropped)


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    client_ip: str | None,
    scheme: str,
    request_id: str,
    trust_forwarded: bool,
) -> CIMultiDict[str]:
    """Headers to send upstream. Host is left out so the client library sets the upstream's own."""
    out = _filtered(incoming, FORWARDING_HEADERS | {"x-request-id"})
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
    drop = {"content-length"} if reframed else set()
    return _filtered(upstream, drop)


def request_id_from(headers: Mapping[str, str]) -> str:
    """The client's X-Request-Id when it is sane (no injection, bounded), else a new one."""
    given = headers.get("X-Request-Id")
    if given and _SANE_REQUEST_ID.match(given):
        return given
    return uuid.uuid4().hex
