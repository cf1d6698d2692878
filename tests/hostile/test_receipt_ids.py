"""Receipt ids (issue 13 row 3, issue 15 item 2) and the receipt endpoint under attack.

Receipt ids are the proxy's, not the client's: two requests with the same X-Request-Id
(same or different credentials) both keep their receipts; no credential can claim or
block another's id; the budget counts every one after a restart; a version-1 database
is migrated; a caller lists its own receipts.

The endpoint with every odd id: empty, dot segments, percent-encoded bytes that are not
UTF-8, unicode, NUL, 10 KB, query strings. Each gets a JSON answer (404 for ids nobody
has, 400 for what HTTP itself refuses), never a 500 or someone else's receipt; after
each the proxy serves and stores receipts as before."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp import web
from helpers import FakeMeter, proxy_config, start_upstream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.carbon.intensity import ConstantIntensity
from proxy.config import config_from_dict
from proxy.receipts import schema
from proxy.receipts.model import FIELD_NAMES, period_keys
from proxy.receipts.sqlite import SqliteReceiptStore
from proxy.serve import Service

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


# -- receipt ids: the proxy's, not the client's ------------------------------------------

VICTIM = "sk-victim-0123456789"
ATTACKER = "sk-attacker-9876543210"
CHAT = "/v1/chat/completions"


async def completion(request: web.Request) -> web.StreamResponse:
    data = await request.json()
    if data.get("stream"):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        usage = {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        await response.write(b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response
    return web.json_response({"id": "c", "object": "chat.completion", "usage": {"prompt_tokens": 3, "completion_tokens": 5}})


class Proxy:
    def __init__(self, service: Service, session: aiohttp.ClientSession) -> None:
        self.service = service
        self.session = session
        self.base = f"http://127.0.0.1:{service.public_port}"

    async def call(self, key: str | None, request_id: str, tenant: str = "team-a", **payload: Any) -> dict[str, str]:
        headers = {"X-Request-Id": request_id, "X-Tenant-Id": tenant}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = {"model": "m", "messages": [], **payload}
        async with self.session.post(self.base + CHAT, json=body, headers=headers) as response:
            assert response.status == 200
            text = await response.read()
            return {"receipt_id": response.headers["X-Carbon-Receipt-Id"], "request_id": response.headers["X-Request-Id"], "body": text}  # type: ignore[dict-item]

    async def get(self, path: str, key: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.session.get(self.base + "/carbon-proxy/v1/receipts" + path, headers=headers) as response:
            return response.status, await response.json()


async def start(db: Path, upstream: str, **tenants: Any) -> tuple[Service, SqliteReceiptStore]:
    store = SqliteReceiptStore(str(db))
    config = proxy_config(upstream, receipts={"path": str(db)}, meter={"interval_ms": 20}, tenants={"header": "X-Tenant-Id", **tenants})
    service = Service(config_from_dict(config), meter=FakeMeter(), intensity=ConstantIntensity(450), receipts=store)
    await service.start()
    return service, store


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    runner, url = await start_upstream({CHAT: completion})
    yield url
    await runner.cleanup()


@pytest.fixture
async def proxy(upstream: str, tmp_path: Path) -> AsyncIterator[Proxy]:
    service, _ = await start(tmp_path / "r.db", upstream)
    session = aiohttp.ClientSession()
    try:
        yield Proxy(service, session)
    finally:
        await session.close()
        await service.stop()


def db_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_a_pre_claimed_client_id_blocks_no_one(proxy: Proxy) -> None:
    stolen = await proxy.call(ATTACKER, "order-42")  # the attacker sends the victim's id first
    mine = await proxy.call(VICTIM, "order-42")
    assert mine["receipt_id"] != stolen["receipt_id"]
    status, body = await proxy.get("/order-42", VICTIM)
    assert status == 200 and body["receipt_id"] == mine["receipt_id"] and body["request_id"] == "order-42"
    status, body = await proxy.get("/order-42", ATTACKER)
    assert status == 200 and body["receipt_id"] == stolen["receipt_id"]
    status, body = await proxy.get(f"/{mine['receipt_id']}", ATTACKER)  # knowing the receipt id is not enough
    assert status == 404 and body["error"]["type"] == "receipt_not_found"
    status, _ = await proxy.get(f"/{mine['receipt_id']}", None)
    assert status == 401


async def test_one_credential_reusing_an_id_keeps_every_receipt(proxy: Proxy, tmp_path: Path) -> None:
    sent = [await proxy.call(VICTIM, "retry-me") for _ in range(5)]
    ids = [s["receipt_id"] for s in sent]
    assert len(set(ids)) == 5 and all(s["request_id"] == "retry-me" for s in sent)
    status, latest = await proxy.get("/retry-me", VICTIM)
    assert status == 200 and latest["receipt_id"] == ids[-1]  # the most recent
    status, every = await proxy.get("/retry-me?all=1", VICTIM)
    assert status == 200 and sorted(r["receipt_id"] for r in every["receipts"]) == sorted(ids)
    for receipt_id in ids:
        status, body = await proxy.get(f"/{receipt_id}", VICTIM)
        assert status == 200 and body["receipt_id"] == receipt_id
    await proxy.service.stop()  # settles and flushes everything
    rows = db_rows(tmp_path / "r.db", "SELECT receipt_id, request_id, status FROM receipts")
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert {r[1] for r in rows} == {"retry-me"} and {r[2] for r in rows} == {"final"}


async def test_the_budget_counts_every_receipt_of_a_reused_id_after_a_restart(upstream: str, tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    tenants = {"budgets": {"team-a": {"grams": 1000.0, "period": "month"}}}
    service, _ = await start(db, upstream, **tenants)
    async with aiohttp.ClientSession() as session:
        proxy = Proxy(service, session)
        for _ in range(5):
            await proxy.call(VICTIM, "same-id")
        await service.stop()
    grams = db_rows(db, "SELECT count(*), sum(co2e_grams) FROM receipts WHERE tenant = 'team-a'")[0]
    assert grams[0] == 5 and grams[1] > 0
    service, _ = await start(db, upstream, **tenants)
    try:
        async with aiohttp.ClientSession() as session:
            await Proxy(service, session).call(VICTIM, "same-id")
        used = service.proxy.budgets.used_grams("team-a")
        assert used is not None and used >= grams[1] * 0.999  # the five of before, plus this one
    finally:
        await service.stop()


async def test_streams_carry_the_receipt_id_in_the_header_and_the_final_figures(proxy: Proxy) -> None:
    sent = await proxy.call(VICTIM, "s-1", stream=True, stream_options={"include_usage": True})
    events = [line for line in bytes(sent["body"]).split(b"\n") if line.startswith(b"data: {")]  # type: ignore[arg-type]
    emissions = orjson.loads(events[-1][6:])["usage"]["emissions"]
    assert emissions["receipt_id"] == sent["receipt_id"]
    status, body = await proxy.get(f"/{sent['receipt_id']}", VICTIM)
    assert status == 200 and body["request_id"] == "s-1"


async def test_a_client_cannot_spoof_the_receipt_id_header(proxy: Proxy) -> None:
    headers = {"X-Carbon-Receipt-Id": "forged", "Authorization": f"Bearer {VICTIM}"}
    async with proxy.session.post(proxy.base + CHAT, json={"model": "m"}, headers=headers) as response:
        assert response.headers["X-Carbon-Receipt-Id"] != "forged"
        assert len(response.headers.getall("X-Carbon-Receipt-Id")) == 1


async def test_listing_pages_through_the_callers_own_receipts_only(proxy: Proxy) -> None:
    mine = [(await proxy.call(VICTIM, f"l-{i}"))["receipt_id"] for i in range(7)]
    await proxy.call(ATTACKER, "l-0")
    seen: list[str] = []
    after = ""
    while True:
        status, page = await proxy.get(f"?limit=3&after={after}", VICTIM)
        assert status == 200 and len(page["receipts"]) <= 3
        seen += [r["receipt_id"] for r in page["receipts"]]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert seen == sorted(mine)  # every one, once, oldest first; none of the attacker's
    status, page = await proxy.get("?since=2000-01-01T00:00:00Z&until=2001-01-01", VICTIM)
    assert status == 200 and page == {"receipts": [], "next_after": None}
    status, page = await proxy.get("?since=0", VICTIM)
    assert status == 200 and len(page["receipts"]) == 7


@pytest.mark.parametrize(
    ("query", "name"), [("?limit=0", "limit"), ("?limit=abc", "limit"), ("?since=yesterday", "since"), ("?until=nan", "until")]
)
async def test_listing_with_a_bad_parameter_is_a_clean_400(proxy: Proxy, query: str, name: str) -> None:
    status, body = await proxy.get(query, VICTIM)
    assert status == 400 and body["error"]["type"] == "invalid_request" and repr(name) in body["error"]["message"]


async def test_listing_needs_a_credential(proxy: Proxy) -> None:
    status, body = await proxy.get("", None)
    assert status == 401 and body["error"]["type"] == "authentication_required"


@pytest.mark.parametrize("odd", ["%00", "x" * 300, "%E2%80%AE", "..%2F..%2Fetc", "%FF", "a%0Ab", "'%20OR%201=1--"])
async def test_odd_ids_are_a_clean_404(proxy: Proxy, odd: str) -> None:
    await proxy.call(VICTIM, "real")
    status, body = await proxy.get(f"/{odd}", VICTIM)
    assert status in (404, 401) and "error" in body
    assert (await proxy.call(VICTIM, "after-odd"))["receipt_id"]  # still serving


async def test_a_version_1_database_is_migrated_and_keeps_its_budget_usage(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_fields = [n for n in FIELD_NAMES if n not in ("receipt_id", "host_energy_joules")]
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE receipts ({', '.join(n + (' PRIMARY KEY' if n == 'request_id' else '') for n in old_fields)})")
    conn.execute("CREATE TABLE tenant_usage (tenant TEXT NOT NULL, period TEXT NOT NULL, co2e_grams REAL NOT NULL DEFAULT 0, PRIMARY KEY (tenant, period)) WITHOUT ROWID")
    started = time.time() - 3600  # inside the retention, or the first housekeeping purges it
    month = period_keys(started)[1]
    for rid in ("old-1", "old-2"):
        values = {n: None for n in old_fields} | {"request_id": rid, "tenant": "team-a", "started_unix": started, "co2e_grams": 0.5, "status": "final"}
        conn.execute(f"INSERT INTO receipts ({', '.join(old_fields)}) VALUES ({', '.join('?' * len(old_fields))})", [values[n] for n in old_fields])
    conn.execute("INSERT INTO tenant_usage VALUES ('team-a', ?, 1.0)", (month,))
    conn.commit()
    conn.close()
    store = SqliteReceiptStore(str(path))
    await store.start()
    try:
        old = await store.get("old-1")
        assert old is not None and old.receipt_id == "old-1" and old.request_id == "old-1"
        assert [r.receipt_id for r in await store.find(None, "old-2", 5)] == ["old-2"]
        assert await store.tenant_usage_grams([month], ["team-a"]) == {("team-a", month): 1.0}
    finally:
        await store.close()
    assert db_rows(path, "PRAGMA user_version") == [(schema.SCHEMA_VERSION,)]
    assert db_rows(path, "SELECT co2e_grams FROM tenant_usage") == [(1.0,)]  # the copy counted nothing twice


async def test_dropped_receipts_show_in_the_metrics(upstream: str) -> None:
    from prometheus_client import CollectorRegistry

    from proxy.receipts.model import MemoryReceiptStore

    registry = CollectorRegistry()
    store = MemoryReceiptStore(max_receipts=2)  # a bound that pushes receipts out
    config = proxy_config(upstream, meter={"interval_ms": 20})
    service = Service(config_from_dict(config), meter=FakeMeter(), intensity=ConstantIntensity(450), receipts=store, registry=registry)
    await service.start()
    try:
        async with aiohttp.ClientSession() as session:
            proxy = Proxy(service, session)
            for i in range(5):
                await proxy.call(None, f"d-{i}")
        assert registry.get_sample_value("carbon_proxy_receipts_dropped_total", {"reason": "store"}) == 3
        assert registry.get_sample_value("carbon_proxy_receipts_dropped_total", {"reason": "accounting_error"}) == 0
    finally:
        await service.stop()
