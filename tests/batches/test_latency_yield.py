"""End to end: interactive latency over its objective pauses a running proxy's batch lines
(the guard's clock is scripted; the latencies are the proxy's own receipts)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from conftest import Rig, chat_lines, jsonl, until, upload

from proxy.batches.latency_guard import MIN_SAMPLES

LINES = 200


class StepClock:
    def __init__(self) -> None:
        self.t = time.monotonic()

    def __call__(self) -> float:
        return self.t


async def _metric(rig: Rig, name: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{rig.service.admin_port}/metrics") as response:
            text = await response.text()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


async def test_a_latency_breach_pauses_batch_lines_until_interactive_latency_recovers(rig: Rig) -> None:
    # Any answer is over a 1 µs objective: interactive requests beside a line breach it.
    await rig.start(scripted=False, interactive_latency_objective_seconds=0.000001, interactive_latency_objective_ratio=0)
    guard, runner = rig.service.batches.guard, rig.service.batches.runner
    clock = StepClock()
    guard.clock = clock
    client = rig.client()
    batch = await client.batches.create(
        input_file_id=(await upload(client, jsonl(chat_lines(LINES)))).id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def running() -> bool:
        return runner.lines_in_flight > 0

    await until(running, "a batch line in flight")
    for i in range(MIN_SAMPLES):  # interactive traffic through the proxy: its receipts feed the guard
        await client.chat.completions.create(model="sim-llm", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=4)
    clock.t += guard.window_seconds  # the window ends, lines ran in it, interactive p95 over objective
    assert runner.allowed_lines() == 0  # paused

    async def drained() -> bool:
        return runner.lines_in_flight == 0

    await until(drained, "the line in flight to end")
    left = runner.lines_deferred
    assert 0 < left < LINES
    assert await _metric(rig, "carbon_proxy_batch_allowed_in_flight_requests") == 0
    assert await _metric(rig, "carbon_proxy_batch_latency_breaches_total") == 1
    for _ in range(10):  # the runner polls the guard meanwhile: nothing starts while paused
        await asyncio.sleep(0.05)
        assert runner.lines_in_flight == 0 and runner.lines_deferred == left
    assert (await client.batches.retrieve(batch.id)).request_counts.completed == LINES - left

    clock.t += guard.window_seconds  # a window without slow interactive answers: lines resume

    async def completed() -> bool:
        return (await client.batches.retrieve(batch.id)).status == "completed"

    await until(completed, "the batch to complete")
    assert (await client.batches.retrieve(batch.id)).request_counts.completed == LINES
    assert guard.breaches == 1
    assert await _metric(rig, "carbon_proxy_batch_deferred_requests") == 0
