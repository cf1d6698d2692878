"""GET /carbon-proxy/v1/receipts/{id} through a running proxy with the SQLite store:
only the credential that made the request reads its receipt."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from helpers import FakeMeter, proxy_config, start_upstream

from proxy.carbon.intensity import ConstantIntensity
from proxy.config import config_from_dict
from proxy.receipts.sqlite import SqliteReceiptStore
from proxy.serve import Service

KEY_A = "sk-test-alpha-0123456789"
KEY_B = "sk-test-bravo-9876543210"


async def completion(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response(
        {
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": "llama-3-8b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46},
        }
    )


class Running:
    def __init__(self, service: Service, store: SqliteReceiptStore, session: aiohttp.ClientSession) -> None:
        self.service = service
        self.store = store
        self.session = session
        self.base = f"http://127.0.0.1:{service.public_port}"

    async def call(self, key: str | None, request_id: str) -> aiohttp.ClientResponse:
        headers = {"X-Request-Id": request_id}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        payload = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hello"}]}
        async with self.session.post(f"{self.base}/v1/chat/completions", json=payload, headers=headers) as response:
            await response.read()
            return response

    async def receipt(self, request_id: str, key: str | None, header: str = "Authorization") -> tuple[int, Any]:
        headers = {header: f"Bearer {key}" if header == "Authorization" else key} if key else {}
        async with self.session.get(f"{self.base}/carbon-proxy/v1/receipts/{request_id}", headers=headers) as response:
            return response.status, await response.json()


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    upstream, url = await start_upstream({"/v1/chat/completions": completion})
    store = SqliteReceiptStore(str(tmp_path / "receipts.db"))
    config = proxy_config(url, receipts={"path": str(tmp_path / "receipts.db")}, meter={"interval_ms": 20})
    service = Service(config_from_dict(config), meter=FakeMeter(), intensity=ConstantIntensity(450), receipts=store)
    await service.start()
    session = aiohttp.ClientSession()
    try:
        yield Running(service, store, session)
    finally:
        await session.close()
        await service.stop()
        await upstream.cleanup()


async def test_the_credential_that_made_the_request_reads_its_receipt(running: Running) -> None:
    response = await running.call(KEY_A, "req-a1")
    assert response.status == 200
    status, body = await running.receipt("req-a1", KEY_A)  # right after the response: no wait
    assert status == 200
    assert body["request_id"] == "req-a1" and body["model"] == "llama-3-8b"
    assert body["prompt_tokens"] == 12 and body["output_tokens"] == 34
    assert body["co2e_grams"] == pytest.approx(body["operational_grams"] + body["embodied_grams"])
    assert body["tenant"].startswith("key:") and body["status"] in ("provisional", "final")
    assert "credential_hash" not in body


async def test_another_credential_gets_404_and_no_credential_gets_401(running: Running) -> None:
    await running.call(KEY_A, "req-a2")
    status, body = await running.receipt("req-a2", KEY_B)
    assert status == 404 and body["error"]["type"] == "receipt_not_found"
    status, body = await running.receipt("req-a2", None)
    assert status == 401 and body["error"]["type"] == "authentication_required"
    # The 404 for "not yours" is the same as for "no such receipt": ids are not disclosed.
    assert (await running.receipt("never-made", KEY_B))[0] == 404


async def test_the_api_key_header_counts_as_the_same_credential(running: Running) -> None:
    await running.call(KEY_A, "req-a3")
    assert (await running.receipt("req-a3", KEY_A, header="X-Api-Key"))[0] == 200


async def test_an_anonymous_receipt_is_not_readable_with_a_credential(running: Running) -> None:
    await running.call(None, "req-anon")
    assert (await running.receipt("req-anon", None))[0] == 200
    assert (await running.receipt("req-anon", KEY_A))[0] == 404


async def test_the_receipt_settles_to_final_and_is_durable(running: Running, tmp_path: Path) -> None:
    await running.call(KEY_A, "req-a4")
    deadline = time.monotonic() + 5
    while True:
        status, body = await running.receipt("req-a4", KEY_A)
        if body.get("status") == "final":
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.02)
    assert body["basis"].endswith("status=final") and body["energy_joules"] > 0
    await running.service.stop()
    data = b"".join(f.read_bytes() for f in tmp_path.glob("receipts.db*"))
    assert KEY_A.encode() not in data  # only the hash is stored


async def test_receipts_are_read_only(running: Running) -> None:
    async with running.session.delete(f"{running.base}/carbon-proxy/v1/receipts/x") as response:
        assert response.status == 405
