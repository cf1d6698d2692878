"""The contract every batch store keeps (SQLite on one proxy, PostgreSQL in a fleet):
both stores pass the same tests."""

from __future__ import annotations

import itertools
from typing import Any, AsyncIterator

import asyncpg
import orjson
import pytest

from proxy.batches.pg_store import PgBatchStore
from proxy.batches.store import BatchStore
from proxy.batches.store_base import BatchStoreLike, Line, Result, StoredFile, new_id


_names = itertools.count()


async def new_database(cluster: Any) -> str:
    """A fresh database on the session's PostgreSQL cluster (tests/fleet's)."""
    name = f"batch_store_{next(_names)}"
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return str(cluster.dsn(name))


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[BatchStoreLike]:
    made: BatchStoreLike
    if request.param == "postgres":
        made = PgBatchStore(await new_database(request.getfixturevalue("cluster")))
    else:
        made = BatchStore(str(tmp_path / "batches.db"))
    await made.start()
    yield made
    await made.close()


def a_batch(created_at: int = 1000, status: str = "in_progress") -> dict[str, Any]:
    return {"id": new_id("batch"), "object": "batch", "status": status, "created_at": created_at, "request_counts": {"total": 3}}


def a_result(line_no: int, ok: bool = True, text: str = "first") -> Result:
    return Result(line_no, ok, orjson.dumps({"custom_id": f"c{line_no}", "text": text}), 1.0, 0.5, 1.5, f"r{line_no}")


async def test_files_belong_to_their_owner(store: BatchStoreLike) -> None:
    content = bytes(range(256)) * 10  # binary-safe
    file = StoredFile(new_id("file"), "alice", "batch", "in.jsonl", len(content), 100)
    await store.add_file(file, content)
    assert await store.file(file.id, "alice") == file
    assert await store.file_content(file.id, "alice") == content
    assert await store.file(file.id, "mallory") is None
    assert await store.file_content(file.id, "mallory") is None
    assert not await store.delete_file(file.id, "mallory")
    assert await store.delete_file(file.id, "alice")
    assert await store.file(file.id, "alice") is None


async def test_files_list_newest_first_in_pages(store: BatchStoreLike) -> None:
    files = [StoredFile(new_id("file"), "alice", "batch" if i % 2 else "batch_output", f"{i}", 1, 100 + i) for i in range(5)]
    for f in files:
        await store.add_file(f, b"x")
    await store.add_file(StoredFile(new_id("file"), "bob", "batch", "b", 1, 200), b"x")
    listed = await store.list_files("alice", None, None, 10)
    assert [f.id for f in listed] == [f.id for f in reversed(files)]
    page = await store.list_files("alice", None, listed[1].id, 2)
    assert [f.id for f in page] == [listed[2].id, listed[3].id]
    assert {f.purpose for f in await store.list_files("alice", "batch", None, 10)} == {"batch"}
    assert await store.list_files("alice", None, "file-unknown", 10) == []


async def test_batches_are_scoped_listed_and_saved(store: BatchStoreLike) -> None:
    batches = [a_batch(created_at=1000 + i) for i in range(3)]
    for b in batches:
        await store.add_batch(b, "alice", "team-a", [])
    other = a_batch(created_at=5000)
    await store.add_batch(other, "bob", "team-b", [])
    assert await store.batch(batches[0]["id"], "alice") == batches[0]
    assert await store.batch(batches[0]["id"], "bob") is None
    assert await store.batch(batches[0]["id"]) == batches[0]  # the runner reads any
    assert await store.owner_of(other["id"]) == ("bob", "team-b")
    listed = await store.list_batches("alice", None, 10)
    assert [b["id"] for b in listed] == [b["id"] for b in reversed(batches)]
    assert [b["id"] for b in await store.list_batches("alice", listed[0]["id"], 1)] == [listed[1]["id"]]
    assert len(await store.all_batches()) == 4

    changed = dict(batches[0], status="completed")
    await store.save_batch(changed, ended_at=2000.0)
    assert (await store.batch(changed["id"]))["status"] == "completed"
    assert changed["id"] not in await store.unfinished()
    assert set(await store.unfinished()) == {batches[1]["id"], batches[2]["id"], other["id"]}


async def test_one_result_per_line_the_first_kept(store: BatchStoreLike) -> None:
    batch = a_batch()
    lines = [Line(i, f"c{i}", orjson.dumps({"n": i})) for i in range(3)]
    await store.add_batch(batch, "alice", "t", lines)
    assert await store.pending_lines(batch["id"]) == lines
    assert await store.add_result(batch["id"], a_result(1))
    assert not await store.add_result(batch["id"], a_result(1, text="second"))  # run twice: kept once
    await store.add_results(batch["id"], [a_result(1, text="third"), a_result(2, ok=False)])
    assert [l.line_no for l in await store.pending_lines(batch["id"])] == [0]
    assert await store.count_results(batch["id"]) == (1, 1)
    results = await store.results(batch["id"])
    assert [(r.line_no, r.ok, orjson.loads(r.record)["text"]) for r in results] == [(1, True, "first"), (2, False, "first")]
    await store.update_grams(batch["id"], 1, 7.0, 9.0)
    assert (await store.results(batch["id"]))[0].grams == 7.0
    await store.forget_lines(batch["id"])
    assert await store.pending_lines(batch["id"]) == [] and await store.results(batch["id"]) == []


async def test_a_validated_batch_gets_its_lines_and_record_together(store: BatchStoreLike) -> None:
    batch = a_batch(status="validating")
    await store.add_batch(batch, "alice", "t", [])
    lines = [Line(i, f"c{i}", b"{}") for i in range(3)]
    await store.add_lines(dict(batch, status="in_progress"), lines)
    assert (await store.batch(batch["id"]))["status"] == "in_progress"
    assert await store.pending_lines(batch["id"]) == lines


async def test_retention_drops_old_finished_batches_and_their_files(store: BatchStoreLike) -> None:
    out = StoredFile(new_id("file"), "alice", "batch_output", "out.jsonl", 1, 100)
    await store.add_file(out, b"x")
    old, young, running = a_batch(), a_batch(), a_batch()
    for b in (old, young, running):
        await store.add_batch(b, "alice", "t", [Line(0, "c0", b"{}")])
    await store.save_batch(dict(old, status="completed", output_file_id=out.id), ended_at=1000.0)
    await store.save_batch(dict(young, status="completed"), ended_at=5000.0)
    assert await store.expire(2000.0) == 1
    assert await store.batch(old["id"]) is None and await store.file(out.id, "alice") is None
    assert await store.batch(young["id"]) is not None and await store.batch(running["id"]) is not None


async def test_the_sole_store_always_holds_the_lease(tmp_path: Any) -> None:
    store = BatchStore(str(tmp_path / "b.db"))
    await store.start()
    try:
        async with store.lease("batch-x", lambda: None) as held:
            assert held and not store.shared
    finally:
        await store.close()


async def test_an_ended_batch_is_not_reopened_by_a_stale_save(store: BatchStoreLike) -> None:
    """In a fleet a cancel may be read on one replica just before another ends the batch:
    its save must not put the ended batch back to cancelling (its results are forgotten)."""
    batch = a_batch()
    await store.add_batch(batch, "alice", "t", [Line(0, "c0", b"{}")])
    stale = await store.batch(batch["id"])
    assert stale is not None
    await store.save_batch(dict(batch, status="completed", output_file_id="file-out"), ended_at=2000.0)
    await store.save_batch(dict(stale, status="cancelling", cancelling_at=1999))
    now = await store.batch(batch["id"])
    assert now is not None and (now["status"], now["output_file_id"]) == ("completed", "file-out")
    assert batch["id"] not in await store.unfinished()


async def test_a_file_written_again_replaces_the_first(store: BatchStoreLike) -> None:
    first = StoredFile("file-out", "alice", "batch_output", "b_output.jsonl", 3, 100)
    await store.add_file(first, b"one")
    again = StoredFile("file-out", "alice", "batch_output", "b_output.jsonl", 5, 200)
    await store.add_file(again, b"again")
    assert [f.id for f in await store.list_files("alice", None, None, 10)] == ["file-out"]
    assert await store.file("file-out", "alice") == again and await store.file_content("file-out", "alice") == b"again"
    with pytest.raises(ValueError):  # never someone else's file
        await store.add_file(StoredFile("file-out", "mallory", "batch_output", "x", 1, 300), b"x")
    assert await store.file_content("file-out", "alice") == b"again" and await store.file("file-out", "mallory") is None
