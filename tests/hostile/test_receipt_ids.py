"""The receipt endpoint with every odd id: empty, dot segments, percent-encoded bytes that
are not UTF-8, unicode, NUL, 10 KB, query strings. Each gets a JSON answer (404 for
ids nobody has, 400 for what HTTP itself refuses), never a 500 or someone else's receipt;
after each the proxy serves and stores receipts as before."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .support import RECEIPTS, HostileProxy, raw_request

AUTH = [(b"Authorization", b"Bearer key-a")]

ODD_IDS = [
    b"",
    b"..",
    b"../..",
    b"../../v1/chat/completions",
    b"%2e%2e",
    b"%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    b"%ff%fe",
    b"%C3%A9t%C3%A9",
    b"\xc3\xa9",  # raw UTF-8 in the target: refused by the HTTP parser
    b"%00",
    b"a%00b",
    b"id?x=1&y=%00",
    b"?",
    b"#frag",
    b"a/b/c",
    b"%0d%0aSet-Cookie:%20x=1",
    b"x" * 8000,
    b"x" * 10_240,  # over aiohttp's 8190-byte request line
    b"*",
    b"%25",
]


@pytest.mark.parametrize("odd", ODD_IDS, ids=lambda b: repr(b[:24]))
async def test_odd_receipt_ids_get_a_json_answer(hostile_proxy: HostileProxy, odd: bytes) -> None:
    response = await raw_request(hostile_proxy.port, "GET", RECEIPTS.encode() + odd, AUTH)
    assert response.status in (400, 404), response.raw[:300]
    error = response.json()["error"]
    assert error["code"] == response.status
    assert "set-cookie" not in response.headers
    await hostile_proxy.after_attack()


async def test_a_query_string_does_not_hide_a_real_receipt(hostile_proxy: HostileProxy) -> None:
    status, _, headers = await hostile_proxy.post("/v1/chat/completions", {"model": "m", "messages": []}, {"Authorization": "Bearer key-a"})
    assert status == 200
    request_id = headers["X-Request-Id"].encode()
    mine = await raw_request(hostile_proxy.port, "GET", RECEIPTS.encode() + request_id + b"?x=%00", AUTH)
    assert mine.status == 200 and mine.json()["request_id"] == request_id.decode()
    # Another credential, none, or a bad one: never the receipt.
    other = await raw_request(hostile_proxy.port, "GET", RECEIPTS.encode() + request_id, [(b"Authorization", b"Bearer key-b")])
    assert other.status == 404
    anonymous = await raw_request(hostile_proxy.port, "GET", RECEIPTS.encode() + request_id, [])
    assert anonymous.status == 401
    bad = await raw_request(hostile_proxy.port, "GET", RECEIPTS.encode() + request_id, [(b"Authorization", b"Bearer key-a\xff")])
    assert bad.status == 400 and bad.json()["error"]["type"] == "invalid_header"
    await hostile_proxy.after_attack()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(odd=st.text(min_size=0, max_size=60))
async def test_any_text_as_a_receipt_id_is_a_json_404(hostile_proxy: HostileProxy, odd: str) -> None:
    target = RECEIPTS.encode() + quote(odd, safe="").encode()
    response = await raw_request(hostile_proxy.port, "GET", target, AUTH)
    assert response.status in (400, 404), response.raw[:300]
    assert response.json()["error"]["code"] == response.status
    await hostile_proxy.after_attack()


@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT"])
async def test_other_methods_on_the_receipt_endpoint(hostile_proxy: HostileProxy, method: str) -> None:
    response = await raw_request(hostile_proxy.port, method, RECEIPTS.encode() + b"x", AUTH, b"{}")
    assert response.status == 405 and response.json()["error"]["code"] == 405
    await hostile_proxy.after_attack()
