"""Batches in a fleet: replicas sharing one PostgreSQL. A batch's lines run under one
replica's lease; when that replica dies mid-batch another takes over once the lease has
expired and resumes (lines with a result never run again); each custom_id appears once
in the output file."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator

import asyncpg
import orjson
import pytest
from aiohttp import web
from conftest import until

from proxy.batches.clock import ManualClock
from proxy.batches.pg_store import PgBatchStore
from proxy.batches.runner import BatchRunner
from proxy.batches.sender import BatchIdentity, LineSender
from proxy.batches.settings import BatchSettings
from proxy.batches.store_base import Line, new_id

T0 = 1_800_000_000.0
LINES = 12
LEASE_SECONDS = 2.0
"""Short, so a takeover happens within the test (production: 30 s)."""


@dataclass
class Upstream:
    """A real local model server that counts each line it is asked, and can hang (a
    replica whose line never comes back)."""

    seen: Counter[str] = field(default_factory=Counter)
    hanging: bool = False
    hang_from: int = 0
    """From this many requests on, hang (0: never)."""
    released: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    def hang(self) -> None:
        self.hanging, self.released = True, asyncio.Event()

    def answer(self) -> None:
        self.hanging = False
        self.released.set()  # the lines held so far answer too

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        question = body["messages"][0]["content"]
        self.seen[question] += 1
        if self.hang_from and sum(self.seen.values()) >= self.hang_from:
            self.hang_from = 0
            self.hang()
        if self.hanging:
            await self.released.wait()
        return web.json_response({"object": "chat.completion", "choices": [{"message": {"content": f"answer to {question}"}}]})


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", up.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield up
    await runner.cleanup()


@dataclass
class Replica:
    store: PgBatchStore
    runner: BatchRunner


async def replica(dsn: str, upstream: Upstream) -> Replica:
    store = PgBatchStore(dsn, lease_seconds=LEASE_SECONDS)
    await store.start()
    settings = BatchSettings(max_concurrency=1, safety_margin_seconds=0)
    sender = LineSender(BatchIdentity(), "127.0.0.1", upstream.port)
    runner = BatchRunner(store, settings, sender, lambda now, horizon: [], ManualClock(T0))
    return Replica(store, runner)


async def submit(store: PgBatchStore) -> str:
    batch = {
        "id": new_id("batch"), "object": "batch", "endpoint": "/v1/chat/completions", "status": "in_progress",
        "created_at": int(T0), "expires_at": int(T0 + 86400),
        "request_counts": {"total": LINES, "completed": 0, "failed": 0},
        "carbon": {"submitted_g_per_kwh": 400.0, "planned_start_at": None},
    }  # fmt: skip
    lines = [
        Line(i, f"req-{i}", orjson.dumps({"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}))
        for i in range(LINES)
    ]
    await store.add_batch(batch, "alice", "team", lines)
    return str(batch["id"])


async def output_ids(store: PgBatchStore, batch_id: str) -> list[str]:
    batch = await store.batch(batch_id)
    assert batch is not None and batch["status"] == "completed", batch
    content = await store.file_content(batch["output_file_id"], "alice")
    assert content is not None
    return [orjson.loads(line)["custom_id"] for line in content.splitlines()]


async def test_two_replicas_one_batch_every_line_runs_once(dsn: str, upstream: Upstream) -> None:
    a, b = await replica(dsn, upstream), await replica(dsn, upstream)
    try:
        batch_id = await submit(a.store)
        # Both replicas see it unfinished and both try to run it, at the same moment.
        a.runner.submit(batch_id)
        b.runner.submit(batch_id)
        await asyncio.gather(a.runner.idle(), b.runner.idle())
        assert await output_ids(b.store, batch_id) == [f"req-{i}" for i in range(LINES)]
        assert upstream.seen == Counter({f"q{i}": 1 for i in range(LINES)})  # no line ran twice
    finally:
        for r in (a, b):
            await r.runner.close()
            await r.store.close()


@pytest.mark.parametrize("death", ["killed", "cut off from the database"])
async def test_a_dead_replicas_batch_is_taken_over_after_its_lease_and_resumed(dsn: str, upstream: Upstream, death: str) -> None:
    a, b = await replica(dsn, upstream), await replica(dsn, upstream)
    try:
        batch_id = await submit(a.store)
        upstream.hang_from = 5  # the first replica's fifth line does not come back...
        a.runner.submit(batch_id)

        async def some_done() -> bool:
            return (await b.store.count_results(batch_id))[0] == 4 and upstream.hanging

        await until(some_done, "four lines run by the first replica, the fifth in flight")
        done_by_a = 4
        # ...and it dies: its connections drop, the lease is neither renewed nor released.
        a.store.pool.terminate()
        if death == "killed":
            await a.runner.close()  # its tasks stop at once
        else:
            await a.runner.idle()  # it stops its lines itself at its next failed renewal
        # While the dead replica's lease lasts, nobody else runs the batch.
        assert batch_id not in await b.store.unfinished()
        upstream.answer()

        async def taken_over() -> bool:
            await b.runner.start()  # what the service's takeover loop does
            return batch_id in b.runner._tasks or (await b.store.batch(batch_id) or {}).get("status") == "completed"

        await until(taken_over, "the lease to expire and the second replica to take over")
        await b.runner.idle()
        assert await output_ids(b.store, batch_id) == [f"req-{i}" for i in range(LINES)]  # each exactly once
        ran_twice = [q for q, n in upstream.seen.items() if n > 1]
        assert len(ran_twice) <= 1  # only the line in flight when it died ran again
        assert done_by_a >= 4 and all(upstream.seen[f"q{i}"] == 1 for i in range(done_by_a))  # resumed, not restarted
    finally:
        for r in (a, b):
            await r.runner.close()
        await b.store.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_cancel_through_another_replica_stops_the_running_one(dsn: str, upstream: Upstream) -> None:
    a, b = await replica(dsn, upstream), await replica(dsn, upstream)
    try:
        batch_id = await submit(a.store)
        upstream.hang()  # the running replica is mid-line when the cancel arrives
        a.runner.submit(batch_id)
        await until(lambda: _true(sum(upstream.seen.values()) >= 1), "a line in flight")
        cancelled = await b.runner.cancel(batch_id)  # through the other replica's API
        assert cancelled is not None and cancelled["status"] == "cancelling"
        await until(lambda: _true(a.runner._wake[batch_id].is_set()), "the running replica to see the cancel at a renewal")
        upstream.answer()

        async def ended() -> bool:
            return (await b.store.batch(batch_id) or {}).get("status") == "cancelled"

        await until(ended, "the running replica to end the batch")
        assert sum(upstream.seen.values()) == 1  # the line in flight; no other line started
        assert (await b.store.batch(batch_id) or {})["request_counts"]["completed"] == 1
    finally:
        for r in (a, b):
            await r.runner.close()
            await r.store.close()


async def test_a_replica_whose_renewal_hangs_stops_before_its_lease_ends(dsn: str, upstream: Upstream) -> None:
    """The database stops answering one replica (its renewal waits on a row lock, as behind
    a network that drops packets): it stops its lines within its lease, so no two replicas
    ever run the batch at once; the other then takes over and resumes."""
    a, b = await replica(dsn, upstream), await replica(dsn, upstream)
    blocker = await asyncpg.connect(dsn)
    try:
        batch_id = await submit(a.store)
        upstream.hang_from = 3  # the first replica is mid-line when its database goes quiet
        a.runner.submit(batch_id)
        await until(lambda: _true(upstream.hanging), "two lines run, the third in flight")
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute("SELECT 1 FROM carbon_batches WHERE id = $1 FOR UPDATE", batch_id)  # renewals now wait
        await until(lambda: _true(batch_id not in a.runner._tasks), "the replica to stop its lines (its renewal timed out)")
        await blocking.rollback()  # the database answers again; the lease the replica held runs out
        upstream.answer()

        async def taken_over() -> bool:
            for batch in await b.store.unfinished():
                b.runner.submit(batch)
            return (await b.store.batch(batch_id) or {}).get("status") == "completed"

        await until(taken_over, "the second replica to take over and complete")
        assert await output_ids(b.store, batch_id) == [f"req-{i}" for i in range(LINES)]
        assert all(upstream.seen[f"q{i}"] == 1 for i in range(2))  # resumed, not restarted
        assert max(upstream.seen.values()) <= 2  # only the line in flight ran again
    finally:
        await blocker.close()
        for r in (a, b):
            await r.runner.close()
            await r.store.close()


class DiesEndingBatches:
    """A replica's store that dies (raises) when the runner ends a batch: after the output
    file is written, before the batch record says so."""

    def __init__(self, store: PgBatchStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def save_batch(self, batch: dict, ended_at: float | None = None) -> None:
        if ended_at is not None:
            raise ConnectionError("the replica died here")
        await self._store.save_batch(batch, ended_at)


async def test_a_batch_finalized_again_after_a_death_has_one_output_file(dsn: str, upstream: Upstream) -> None:
    a, b = await replica(dsn, upstream), await replica(dsn, upstream)
    try:
        batch_id = await submit(a.store)
        a.runner.store = DiesEndingBatches(a.store)  # type: ignore[assignment]
        a.runner.submit(batch_id)
        await a.runner.idle()  # it wrote the output file and died before ending the batch
        assert (await b.store.batch(batch_id) or {}).get("status") == "finalizing"
        assert [f.purpose for f in await b.store.list_files("alice", None, None, 10)] == ["batch_output"]
        b.runner.submit(batch_id)  # the lease was released (or ran out): the other replica finalizes
        await b.runner.idle()
        assert await output_ids(b.store, batch_id) == [f"req-{i}" for i in range(LINES)]
        files = await b.store.list_files("alice", None, None, 10)
        done = await b.store.batch(batch_id)
        assert done is not None and [f.id for f in files] == [done["output_file_id"]]  # one, not an orphan beside it
        assert upstream.seen == Counter({f"q{i}": 1 for i in range(LINES)})
    finally:
        for r in (a, b):
            await r.runner.close()
            await r.store.close()


def test_the_fleet_backend_bounds_the_file_size() -> None:
    from proxy.batches.settings import parse_batches, with_fleet
    from proxy.config import ReceiptsConfig
    from proxy.errors import ConfigError

    fleet = ReceiptsConfig(backend="postgres", dsn="postgresql://carbon@127.0.0.1/db")
    assert with_fleet(parse_batches({}), fleet).dsn == "postgresql://carbon@127.0.0.1/db"
    with pytest.raises(ConfigError) as error:
        with_fleet(parse_batches({"max_file_bytes": 2 * 1024**3}), fleet)
    assert error.value.key == "batches.max_file_bytes" and "PostgreSQL" in str(error.value)
    assert with_fleet(parse_batches({"max_file_bytes": 2 * 1024**3}), ReceiptsConfig()).dsn is None  # SQLite: no such bound
