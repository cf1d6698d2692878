"""Bad input gets a clear error: per-line validation, limits, and the trusted batch header."""

from __future__ import annotations

import hashlib

import openai
import orjson
import pytest
from aiohttp import web
from conftest import Rig, chat_lines, checked, jsonl, until, upload
from helpers import start_proxy, start_upstream

from proxy.batches.sender import BATCH_HEADER
from proxy.receipts.model import ReceiptQuery


async def test_bad_lines_fail_the_batch_with_each_line_named(rig: Rig) -> None:
    await rig.start()
    client = rig.client()
    good = chat_lines(5)
    good[1]["url"] = "/v1/embeddings"
    good[2]["custom_id"] = good[0]["custom_id"]
    good[3]["method"] = "GET"
    good[4]["body"] = {"model": "sim-llm", "messages": [], "stream": True}
    content = jsonl(good[:1]) + b"{not json\n" + jsonl(good[1:])
    created = await client.batches.create(
        input_file_id=(await upload(client, content)).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert created.status == "validating" and created.request_counts.total == 0  # checked after the answer, as OpenAI
    batch = await checked(client, created.id)
    assert batch.status == "failed" and batch.failed_at is not None and batch.in_progress_at is None
    found = [(e.line, e.code) for e in batch.errors.data]
    assert found == [
        (2, "invalid_json_line"),
        (3, "mismatched_url"),
        (4, "duplicate_custom_id"),
        (5, "invalid_method"),
        (6, "invalid_body"),
    ]
    assert (await client.batches.retrieve(batch.id)).status == "failed"


async def test_limits_are_enforced_with_the_key_named(rig: Rig) -> None:
    await rig.start(max_lines=3, max_file_bytes=2000)
    client = rig.client()
    created = await client.batches.create(
        input_file_id=(await upload(client, jsonl(chat_lines(4)))).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    too_many = await checked(client, created.id)
    assert too_many.status == "failed"
    assert too_many.errors.data[0].code == "too_many_requests" and "batches.max_lines" in too_many.errors.data[0].message
    with pytest.raises(openai.APIStatusError) as big:
        await upload(client, jsonl(chat_lines(30)))
    assert big.value.status_code == 413 and "batches.max_file_bytes" in str(big.value)


async def test_bad_requests_name_the_parameter(rig: Rig) -> None:
    await rig.start()
    client = rig.client()
    file = await upload(client, jsonl(chat_lines(1)))
    with pytest.raises(openai.BadRequestError) as window:
        await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="48h")  # type: ignore[arg-type]
    assert "completion_window" in str(window.value)
    with pytest.raises(openai.BadRequestError) as endpoint:
        await client.batches.create(input_file_id=file.id, endpoint="/v1/images", completion_window="24h")  # type: ignore[arg-type]
    assert "endpoint" in str(endpoint.value)
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError) as purpose:
        await client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    assert "purpose" in str(purpose.value)


async def test_a_client_cannot_forge_the_batch_header() -> None:
    seen: list[dict[str, str]] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    runner, url = await start_upstream({"/v1/chat/completions": chat})
    service = await start_proxy(url)
    try:
        victim = hashlib.sha256(b"sk-victim").hexdigest()
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{service.public_port}/v1",
            api_key="sk-mallory",
            max_retries=0,
            default_headers={BATCH_HEADER: f"guess;{victim};victim-team"},
        )
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await client.close()
        assert BATCH_HEADER.lower() not in {k.lower() for k in seen[0]}  # never reaches the upstream
        assert await service.proxy.receipts.list(ReceiptQuery(credential_hash=victim)) == []
        mallory = hashlib.sha256(b"sk-mallory").hexdigest()
        assert len(await service.proxy.receipts.list(ReceiptQuery(credential_hash=mallory))) == 1
    finally:
        await service.stop()
        await runner.cleanup()


def test_results_keep_the_first_answer_per_line(tmp_path) -> None:
    import asyncio

    from proxy.batches.store import BatchStore, Line, Result

    async def scenario() -> list[Result]:
        store = BatchStore(str(tmp_path / "b.db"))
        await store.start()
        await store.add_batch({"id": "batch-1", "created_at": 1}, "owner", "t", [Line(1, "a", b"{}"), Line(2, "b", b"{}")])
        assert await store.add_result("batch-1", Result(1, True, b'{"first":1}', 1.0, 0.1, 0.2))
        assert not await store.add_result("batch-1", Result(1, True, b'{"second":1}', 2.0, 0.1, 0.2))
        assert [l.line_no for l in await store.pending_lines("batch-1")] == [2]
        results = await store.results("batch-1")
        await store.close()
        return results

    results = asyncio.run(scenario())
    assert [orjson.loads(r.record) for r in results] == [{"first": 1}]


async def test_disabled_the_paths_reach_an_upstream_that_serves_its_own() -> None:
    async def own_batches(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "upstream-batch"}], "has_more": False})

    runner, url = await start_upstream({"/v1/batches": own_batches})
    service = await start_proxy(url, batches={"enabled": False})
    try:
        assert service.batches is None
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{service.public_port}/v1", api_key="k", max_retries=0)
        page = await client.batches.list()
        await client.close()
        assert page.data[0].id == "upstream-batch"
    finally:
        await service.stop()
        await runner.cleanup()


async def test_a_batch_is_validating_while_its_file_is_checked_and_the_check_survives_a_restart(rig: Rig, monkeypatch) -> None:
    import threading

    import proxy.batches.runner as runner_module

    gate = threading.Event()  # holds the check (in its worker thread) until the test lets it go
    real = runner_module.parse_input

    def held(*args):
        gate.wait(30)
        return real(*args)

    monkeypatch.setattr(runner_module, "parse_input", held)
    first = await rig.start(scripted=False)
    client = rig.client()
    made = [
        await client.batches.create(
            input_file_id=(await upload(client, jsonl(chat_lines(2)))).id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        for _ in range(2)
    ]
    to_cancel, to_resume = (b.id for b in made)
    assert (await client.batches.retrieve(to_resume)).status == "validating"  # still being checked
    assert (await client.batches.cancel(to_cancel)).status == "cancelling"
    rig.services.remove(first)
    await first.stop()  # a crash mid-check: the batch is still validating in the database
    gate.set()
    monkeypatch.undo()

    await rig.start(scripted=False)
    client = rig.client()
    cancelled = await checked(client, to_cancel)
    resumed = await checked(client, to_resume)
    assert resumed.status in ("in_progress", "finalizing", "completed") and resumed.request_counts.total == 2
    for batch_id, status in ((to_cancel, "cancelled"), (to_resume, "completed")):
        async def ended(batch_id: str = batch_id, status: str = status) -> bool:
            return (await client.batches.retrieve(batch_id)).status == status

        await until(ended, f"{batch_id} {status}")
    assert cancelled.request_counts.completed == 0
    assert (await client.batches.retrieve(to_resume)).request_counts.completed == 2
