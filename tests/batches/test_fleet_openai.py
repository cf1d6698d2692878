"""The Batch API of proxies configured with the fleet backend (`[receipts] backend =
"postgres"`), through the official openai client: batches and files live in PostgreSQL,
so any replica answers for any batch (and only to its credential), and a restart
mid-batch resumes from the database."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from typing import Any

import openai
import orjson
import pytest
from conftest import HOUR, OWNER_KEY, T0, Rig, chat_lines, jsonl, until, upload

from proxy.batches import cli as batches_cli
from proxy.batches.pg_store import PgBatchStore


def fleet(dsn: str, tmp_path: Any, name: str) -> dict[str, Any]:
    return {"backend": "postgres", "dsn": dsn, "path": str(tmp_path / f"{name}-receipts.db")}


def client(rig: Rig, service: Any, key: str = OWNER_KEY) -> openai.AsyncOpenAI:
    return rig._client(f"http://127.0.0.1:{service.public_port}/v1", key)


async def test_replicas_share_batches_and_a_restart_resumes_from_postgres(rig: Rig, dsn: str, tmp_path: Any) -> None:
    first = await rig.start(receipts=fleet(dsn, tmp_path, "a"), max_concurrency=1)
    other = await rig.start(receipts=fleet(dsn, tmp_path, "b"), max_concurrency=1)
    assert isinstance(first.batches.store, PgBatchStore) and isinstance(other.batches.store, PgBatchStore)
    on_first, on_other = client(rig, first), client(rig, other)

    lines = chat_lines(12, max_tokens=300)  # natural lengths: the restart lands mid-batch
    file = await upload(on_first, jsonl(lines))
    batch = await on_first.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")

    # Any replica answers for any batch and file; only to the credential that made them.
    assert (await on_other.files.retrieve(file.id)).bytes == len(jsonl(lines))
    assert (await on_other.files.content(file.id)).content == jsonl(lines)
    assert [b.id for b in (await on_other.batches.list()).data] == [batch.id]

    async def planned() -> bool:
        return (await on_other.batches.retrieve(batch.id)).model_extra["carbon"]["planned_start_at"] is not None

    await until(planned, "the batch's plan")
    assert (await on_other.batches.retrieve(batch.id)).model_extra["carbon"]["planned_start_at"] == T0 + 6 * HOUR
    stranger = client(rig, other, "sk-someone-else")
    for call in (stranger.batches.retrieve(batch.id), stranger.files.content(file.id), stranger.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            await call
    assert (await stranger.batches.list()).data == []

    rig.clock.set(T0 + 6 * HOUR)  # the clean window: the replica holding the batch runs it

    async def some_done() -> bool:
        return (await on_other.batches.retrieve(batch.id)).request_counts.completed >= 3

    await until(some_done, "a few lines")
    rig.services.remove(first)
    await first.stop()  # a restart: the lease is handed back, the rest waits in PostgreSQL
    left = (await on_other.batches.retrieve(batch.id)).request_counts.completed
    assert 3 <= left < 12

    restarted = await rig.start(receipts=fleet(dsn, tmp_path, "a"), max_concurrency=1)  # same database, new process state

    async def completed() -> bool:
        return (await client(rig, restarted).batches.retrieve(batch.id)).status == "completed"

    await until(completed, "the batch to resume and complete")
    done = await on_other.batches.retrieve(batch.id)
    assert done.request_counts.completed == 12 and done.request_counts.failed == 0
    output = [orjson.loads(l) for l in (await on_other.files.content(done.output_file_id)).content.splitlines()]
    assert [o["custom_id"] for o in output] == [l["custom_id"] for l in lines]  # each once, in order
    assert all(o["response"]["status_code"] == 200 for o in output)

    # `carbon-proxy batches --config` lists them from the fleet's database.
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[[upstreams]]\nname = "sim"\nurl = "{rig.sim.url}"\n\n'
        f'[receipts]\npath = "{tmp_path / "cli-receipts.db"}"\nbackend = "postgres"\ndsn = "{dsn}"\n'
    )
    out = io.StringIO()
    args = argparse.Namespace(config=str(config), db=None, dsn=None, format="json")
    assert await asyncio.to_thread(batches_cli.run, args, out) == 0
    listed = json.loads(out.getvalue())
    assert [(b["id"], b["status"], b["request_counts"]["completed"]) for b in listed] == [(batch.id, "completed", 12)]
