"""The official `openai` client drives the Batch API; the grid and the clock are scripted."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import orjson
import pytest
from conftest import HOUR, OWNER_HASH, T0, Rig, chat_lines, checked, jsonl, until, upload

from proxy.receipts.model import ReceiptQuery


async def _planned(rig: Rig, batch_id: str) -> dict:
    async def planned() -> bool:
        return (await rig.client().batches.retrieve(batch_id)).model_extra["carbon"]["planned_start_at"] is not None

    await until(planned, "the batch's plan")
    return (await rig.client().batches.retrieve(batch_id)).model_extra["carbon"]


async def _ended(rig: Rig, batch_id: str, status: str):
    async def ended() -> bool:
        return (await rig.client().batches.retrieve(batch_id)).status == status

    await until(ended, f"status {status}")
    return await rig.client().batches.retrieve(batch_id)


async def _owner_receipts(rig: Rig) -> list:
    return await rig.service.proxy.receipts.list(ReceiptQuery(credential_hash=OWNER_HASH, limit=1000))


async def test_lines_run_in_the_cleanest_window_and_match_the_upstream(rig: Rig) -> None:
    await rig.start()
    client = rig.client()
    lines = chat_lines(6)
    file = await upload(client, jsonl(lines))
    assert file.purpose == "batch" and file.bytes == len(jsonl(lines))
    batch = await client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "nightly"}
    )
    assert batch.status == "validating" and batch.in_progress_at is None and batch.metadata == {"job": "nightly"}
    batch = await checked(client, batch.id)
    assert batch.status == "in_progress" and batch.request_counts.total == 6 and batch.in_progress_at == T0
    carbon = await _planned(rig, batch.id)
    assert carbon["planned_start_at"] == T0 + 6 * HOUR  # the 100 g/kWh window, not now (400)
    assert carbon["submitted_g_per_kwh"] == 400
    assert await _owner_receipts(rig) == []  # nothing has run while the grid is dirty
    retrieved = await client.batches.retrieve(batch.id)
    assert retrieved.status == "in_progress" and retrieved.request_counts.completed == 0

    rig.clock.set(T0 + 6 * HOUR)
    done = await _ended(rig, batch.id, "completed")
    assert done.request_counts.completed == 6 and done.request_counts.failed == 0
    assert done.output_file_id and done.error_file_id is None and done.completed_at == T0 + 6 * HOUR

    output = [orjson.loads(l) for l in (await client.files.content(done.output_file_id)).content.splitlines()]
    assert [o["custom_id"] for o in output] == [l["custom_id"] for l in lines]
    direct = rig.direct()
    for line, out in zip(lines, output):
        assert out["error"] is None and out["response"]["status_code"] == 200
        expected = await direct.chat.completions.create(**line["body"])
        body = out["response"]["body"]
        assert body["choices"][0]["message"]["content"] == expected.choices[0].message.content
        assert body["usage"]["completion_tokens"] == expected.usage.completion_tokens

    receipts = await _owner_receipts(rig)  # every line went through the metered path, as its owner
    assert len(receipts) == 6 and all(r.intensity_g_per_kwh == pytest.approx(100.0) for r in receipts)
    figures = done.model_extra["carbon"]
    emitted = sum(r.operational_grams + r.embodied_grams for r in receipts)
    assert figures["emitted_grams"] == pytest.approx(emitted, rel=1e-3)
    operational = sum(r.operational_grams for r in receipts)
    assert figures["run_now_grams"] == pytest.approx(emitted + 3 * operational, rel=1e-3)  # 400 instead of 100 g/kWh
    assert figures["avoided_grams"] == pytest.approx(figures["run_now_grams"] - figures["emitted_grams"], abs=1e-5)
    assert figures["avoided_grams"] > 0

    metrics = rig.service.registry
    assert metrics.get_sample_value("carbon_proxy_batch_lines_total", {"state": "completed"}) == 6
    assert metrics.get_sample_value("carbon_proxy_batch_avoided_co2e_grams_total") == pytest.approx(figures["avoided_grams"], rel=1e-3)


async def test_without_a_forecast_the_batch_runs_now(rig: Rig) -> None:
    await rig.start(scripted=False)  # the wall clock; the grid's `at` only: a flat forecast
    client = rig.client()
    batch = await client.batches.create(
        input_file_id=(await upload(client, jsonl(chat_lines(3)))).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await _ended(rig, batch.id, "completed")
    assert batch.created_at <= done.model_extra["carbon"]["planned_start_at"] <= done.completed_at  # not hours later
    assert done.request_counts.completed == 3


async def test_a_batch_that_cannot_finish_before_its_deadline_expires(rig: Rig) -> None:
    await rig.start()
    client = rig.client()
    batch = await client.batches.create(
        input_file_id=(await upload(client, jsonl(chat_lines(4)))).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.expires_at == T0 + 24 * HOUR
    await _planned(rig, batch.id)
    rig.clock.set(T0 + 25 * HOUR)  # the runner was kept from its window until after the deadline
    done = await _ended(rig, batch.id, "expired")
    assert done.expired_at == T0 + 25 * HOUR and done.output_file_id is None
    assert done.request_counts.completed == 0 and done.request_counts.failed == 4
    errors = [orjson.loads(l) for l in (await client.files.content(done.error_file_id)).content.splitlines()]
    assert [e["custom_id"] for e in errors] == [f"req-{i}" for i in range(4)]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"} and all(e["response"] is None for e in errors)
    assert await _owner_receipts(rig) == []


async def test_cancel_stops_a_waiting_batch(rig: Rig) -> None:
    await rig.start()
    client = rig.client()
    batch = await client.batches.create(
        input_file_id=(await upload(client, jsonl(chat_lines(4)))).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await _planned(rig, batch.id)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at == T0
    done = await _ended(rig, batch.id, "cancelled")
    assert done.request_counts.completed == 0 and done.output_file_id is None
    rig.clock.set(T0 + 6 * HOUR)
    assert await _owner_receipts(rig) == []  # the clean window came and nothing ran
    with pytest.raises(openai.APIStatusError) as again:
        await client.batches.cancel(batch.id)
    assert again.value.status_code == 409


async def test_a_restart_mid_batch_resumes_without_duplicates(rig: Rig) -> None:
    first = await rig.start(max_concurrency=1)
    client = rig.client()
    lines = chat_lines(12, max_tokens=300)  # natural lengths (16-128 tokens): the restart lands mid-batch
    batch = await client.batches.create(
        input_file_id=(await upload(client, jsonl(lines))).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await _planned(rig, batch.id)
    rig.clock.set(T0 + 6 * HOUR)

    async def some_done() -> bool:
        return (await client.batches.retrieve(batch.id)).request_counts.completed >= 3

    await until(some_done, "a few lines")
    rig.services.remove(first)
    await first.stop()  # a line may be in flight: it runs again, once in the output
    ran_before = (await first.proxy.receipts.list(ReceiptQuery(credential_hash=OWNER_HASH, limit=1000)))
    assert 3 <= len(ran_before) < 12

    await rig.start(max_concurrency=1)  # same database file, new process state
    client = rig.client()
    done = await _ended(rig, batch.id, "completed")
    assert done.request_counts.completed == 12
    output = [orjson.loads(l) for l in (await client.files.content(done.output_file_id)).content.splitlines()]
    assert [o["custom_id"] for o in output] == [l["custom_id"] for l in lines]  # each once, in order
    resumed = await _owner_receipts(rig)
    assert len(ran_before) + len(resumed) in (12, 13)  # at most the one line in flight ran twice


async def test_other_credentials_see_nothing(rig: Rig) -> None:
    await rig.start()
    owner, other = rig.client(), rig.client("sk-someone-else")
    file = await upload(owner, jsonl(chat_lines(2)))
    batch = await owner.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (
        other.batches.retrieve(batch.id),
        other.batches.cancel(batch.id),
        other.files.retrieve(file.id),
        other.files.content(file.id),
        other.files.delete(file.id),
        other.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            await call
    assert (await other.batches.list()).data == []
    assert (await other.files.list()).data == []
    assert [f.id for f in (await owner.files.list(purpose="batch")).data] == [file.id]
    assert [b.id for b in (await owner.batches.list()).data] == [batch.id]
    async with aiohttp.ClientSession() as session:  # no credential at all
        async with session.get(f"http://127.0.0.1:{rig.service.public_port}/v1/batches/{batch.id}") as response:
            assert response.status == 401
            assert (await response.json())["error"]["type"] == "authentication_required"
    assert (await owner.files.delete(file.id)).deleted is True
    with pytest.raises(openai.NotFoundError):
        await owner.files.retrieve(file.id)


async def test_list_pages_newest_first(rig: Rig) -> None:
    await rig.start()
    client = rig.client()
    file = await upload(client, jsonl(chat_lines(1)))
    made = []
    for _ in range(3):
        made.append((await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")).id)
        rig.clock.advance(1)
    first = await client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    second = await client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == [made[0]] and not second.has_more


async def test_the_command_line_lists_batches_and_avoided_grams(rig: Rig, capsys) -> None:
    from proxy.cli import main

    await rig.start()
    client = rig.client()
    batch = await client.batches.create(
        input_file_id=(await upload(client, jsonl(chat_lines(2)))).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await _planned(rig, batch.id)
    rig.clock.set(T0 + 6 * HOUR)
    done = await _ended(rig, batch.id, "completed")
    path = rig.service.batches.settings.path
    assert await asyncio.to_thread(main, ["batches", "--db", path]) == 0  # a process of its own: its own loop
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith(batch.id))
    assert row.split()[1] == "completed" and f"{done.model_extra['carbon']['avoided_grams']:.4f}" in row
    assert await asyncio.to_thread(main, ["batches", "--db", path, "--format", "json"]) == 0
    assert '"avoided_grams"' in capsys.readouterr().out


async def test_a_restart_plans_with_the_time_per_line_learned_before_it(rig: Rig) -> None:
    from proxy.batches.runner import DEFAULT_SECONDS_PER_LINE

    first = await rig.start()
    client = rig.client()
    batch = await client.batches.create(
        input_file_id=(await upload(client, jsonl(chat_lines(4)))).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await _planned(rig, batch.id)
    rig.clock.set(T0 + 6 * HOUR)
    done = await _ended(rig, batch.id, "completed")
    learned = done.model_extra["carbon"]["seconds_per_line"]
    assert learned != DEFAULT_SECONDS_PER_LINE and learned == round(first.batches.runner.seconds_per_line, 6)
    rig.services.remove(first)
    await first.stop()

    await rig.start()  # same database: not the cold guess
    assert rig.service.batches.runner.seconds_per_line == learned
