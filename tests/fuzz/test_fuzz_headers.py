"""Fuzzing the header rules on random header sets (names in any case, duplicates,
Connection listing arbitrary names). Invariants:

- upstream_request_headers: the client's headers pass unchanged and in order, except
  hop-by-hop ones (RFC 9110 7.6.1, and every name Connection lists), emissions headers
  (no spoofing), and those the proxy sets itself: Host (the upstream's own), Content-Length
  (the body may be rewritten), X-Forwarded-* and X-Request-Id, which it sets exactly once.
- client_response_headers: the upstream's headers pass unchanged and in order, except
  hop-by-hop and emissions headers, and Content-Length when the proxy reframes the body.
- request_id_from: the client's X-Request-Id when the whole of it is sane (1-128 of
  A-Z a-z 0-9 . _ : -), else a new 32-hex id; never raises.
"""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import EMISSIONS_HEADERS, HOP_BY_HOP, client_response_headers, request_id_from, upstream_request_headers

from . import fuzz

FUZZ = fuzz(300)
SET_BY_PROXY = {"host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
KNOWN = sorted(HOP_BY_HOP | EMISSIONS_HEADERS | SET_BY_PROXY | {"authorization", "content-type", "accept", "cookie", "x-api-key"})
TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~", min_size=1, max_size=12)


@st.composite
def names(draw: st.DrawFn) -> str:
    name = draw(st.one_of(st.sampled_from(KNOWN), TOKEN))
    # Any case: multidict and the rules are case-insensitive.
    return "".join(c.upper() if draw(st.booleans()) else c.lower() for c in name)


VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=20)


@st.composite
def header_sets(draw: st.DrawFn) -> CIMultiDictProxy[str]:
    pairs = draw(st.lists(st.tuples(names(), VALUES), max_size=12))
    for _ in range(draw(st.integers(0, 2))):  # Connection, listing names present or not
        listed = draw(st.lists(names(), max_size=4))
        separators = draw(st.lists(st.sampled_from([",", ", ", " ,", ",,", " , "]), min_size=len(listed), max_size=len(listed)))
        value = "".join(n + s for n, s in zip(listed, separators))
        pairs.insert(draw(st.integers(0, len(pairs))), (draw(st.sampled_from(["Connection", "connection", "CONNECTION"])), value))
    return CIMultiDictProxy(CIMultiDict(pairs))


def listed_in_connection(headers: CIMultiDictProxy[str]) -> set[str]:
    return {t.strip().lower() for value in headers.getall("Connection", []) for t in value.split(",") if t.strip()}


def passing(headers: CIMultiDictProxy[str], dropped: set[str]) -> list[tuple[str, str]]:
    gone = dropped | HOP_BY_HOP | EMISSIONS_HEADERS | listed_in_connection(headers)
    return [(k, v) for k, v in headers.items() if k.lower() not in gone]


@FUZZ
@given(
    incoming=header_sets(),
    client_ip=st.one_of(st.none(), st.sampled_from(["127.0.0.1", "10.1.2.3", "::1"])),
    scheme=st.sampled_from(["http", "https"]),
    trust=st.booleans(),
)
def test_upstream_request_headers(incoming: CIMultiDictProxy[str], client_ip: str | None, scheme: str, trust: bool) -> None:
    out = upstream_request_headers(incoming, client_ip=client_ip, scheme=scheme, request_id="rid-1", trust_forwarded=trust)
    own = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
    assert [(k, v) for k, v in out.items() if k.lower() not in own] == passing(incoming, SET_BY_PROXY)
    for name in HOP_BY_HOP | EMISSIONS_HEADERS | {"host", "content-length"}:
        assert name not in out
    assert out.getall("X-Request-Id") == ["rid-1"]
    forwarded_proto = incoming.get("X-Forwarded-Proto") if trust else None
    assert out.getall("X-Forwarded-Proto") == [forwarded_proto or scheme]
    chain = incoming.get("X-Forwarded-For") if trust else None
    expected_for = [] if not client_ip else [f"{chain}, {client_ip}" if chain else client_ip]
    assert out.getall("X-Forwarded-For", []) == expected_for
    assert out.getall("X-Forwarded-Host", []) == ([incoming["Host"]] if "Host" in incoming else [])


@FUZZ
@given(upstream=header_sets(), reframed=st.booleans())
def test_client_response_headers(upstream: CIMultiDictProxy[str], reframed: bool) -> None:
    out = client_response_headers(upstream, reframed=reframed)
    assert list(out.items()) == passing(upstream, {"content-length"} if reframed else set())
    for name in HOP_BY_HOP | EMISSIONS_HEADERS:
        assert name not in out


SANE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@FUZZ
@given(given_id=st.one_of(st.none(), st.text(max_size=140), st.from_regex(SANE, fullmatch=True)))
@example(given_id="abc\n")  # `$` matches before a final newline
def test_request_id_from(given_id: str | None) -> None:
    headers = CIMultiDictProxy(CIMultiDict([] if given_id is None else [("X-Request-Id", given_id)]))
    rid = request_id_from(headers)
    if given_id is not None and SANE.fullmatch(given_id):
        assert rid == given_id
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
