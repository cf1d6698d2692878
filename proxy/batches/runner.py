"""Runs batches: waits for each one's planned window, sends its lines, writes its files.

One task per unfinished batch. All changes to a batch's record go through `update`
(one lock per batch, read-modify-write), so a cancel from the API and the runner's own
progress never overwrite each other. Lines share one concurrency cap over all batches
(`max_concurrency`, lowered and paused by the latency guard while interactive latency is
over its objective) and wait while interactive traffic is heavy.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Awaitable, Callable

import orjson

from proxy.batches.clock import Clock
from proxy.batches.latency_guard import LatencyGuard
from proxy.batches.lines import Parsed, parse_input
from proxy.batches.scheduler import plan
from proxy.batches.sender import Answer, LineSender
from proxy.batches.settings import BatchSettings
from proxy.batches.store_base import BatchStoreLike, Line, Result, StoredFile, derived_id
from proxy.carbon.forecast import ForecastWindow
from proxy.header_guard import where

log = logging.getLogger("carbon_proxy")

TERMINAL = frozenset(("completed", "failed", "expired", "cancelled"))
DEFAULT_SECONDS_PER_LINE = 5.0
"""Before any line has run: a guess at one line's time (learned from then on)."""

Forecast = Callable[[float, float], list[ForecastWindow]]
ReceiptGrams = Callable[[str], Awaitable[tuple[float, float, float, bool] | None]]
"""receipt id -> (operational grams, embodied grams, g/kWh, final) of its receipt, if any."""
SETTLE_WAIT_SECONDS = 5.0
"""How long finalizing waits for the last lines' receipts to settle (a few meter samples)."""


class BatchRunner:
    def __init__(
        self,
        store: BatchStoreLike,
        settings: BatchSettings,
        sender: LineSender,
        forecast: Forecast,
        clock: Clock,
        interactive_in_flight: Callable[[], int] = lambda: 0,
        receipt_grams: ReceiptGrams | None = None,
        on_line: Callable[[str], None] = lambda state: None,
        on_avoided: Callable[[float], None] = lambda grams: None,
        guard: LatencyGuard | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.sender = sender
        self.forecast = forecast
        self.clock = clock
        self._interactive = interactive_in_flight
        self._receipt_grams = receipt_grams
        self._on_line = on_line
        self._on_avoided = on_avoided
        self.guard = guard
        self._line_ended = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.seconds_per_line = DEFAULT_SECONDS_PER_LINE
        self.lines_in_flight = 0
        self._unstarted: dict[str, int] = {}

    async def start(self) -> None:
        """Resume every batch a previous run left unfinished, with the time per line the
        last finished batch learned (a restart does not plan from the cold guess)."""
        for batch in reversed(await self.store.all_batches()):
            learned = (batch.get("carbon") or {}).get("seconds_per_line")
            if batch["status"] in TERMINAL and isinstance(learned, (int, float)) and learned > 0:
                self.seconds_per_line = float(learned)
                break
        for batch_id in await self.store.unfinished():
            self.submit(batch_id)

    def submit(self, batch_id: str) -> None:
        if batch_id not in self._tasks:
            self._wake[batch_id] = asyncio.Event()
            self._tasks[batch_id] = asyncio.create_task(self._drive(batch_id), name=f"batch {batch_id}")

    async def idle(self) -> None:
        """Wait until no batch is running (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        await self.sender.close()

    async def update(self, batch_id: str, change: Callable[[dict[str, Any]], None], ended: bool = False) -> dict[str, Any] | None:
        async with self._locks.setdefault(batch_id, asyncio.Lock()):
            batch = await self.store.batch(batch_id)
            if batch is None:
                return None
            change(batch)
            await self.store.save_batch(batch, ended_at=self.clock.now() if ended else None)
            return batch

    async def cancel(self, batch_id: str) -> dict[str, Any] | None:
        def mark(batch: dict[str, Any]) -> None:
            if batch["status"] in ("validating", "in_progress"):
                batch["status"] = "cancelling"
                batch["cancelling_at"] = int(self.clock.now())

        batch = await self.update(batch_id, mark)
        if batch is not None and batch["status"] == "cancelling":
            self.submit(batch_id)  # a batch left cancelling by a crash has no task yet
            self._wake[batch_id].set()
        return batch

    # -- one batch ---------------------------------------------------------------------

    async def _drive(self, batch_id: str) -> None:
        try:
            # In a fleet, only the replica holding the batch's lease runs its lines.
            async with self.store.lease(batch_id, self._wake[batch_id].set) as held:
                if held:
                    await self._run(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a dead store: the batch resumes at the next start
            log.error("batch %s stopped (%s)", batch_id, where(exc))
        finally:
            self._tasks.pop(batch_id, None)

    async def _run(self, batch_id: str) -> None:
        batch = await self.store.batch(batch_id)
        owner = await self.store.owner_of(batch_id)
        if batch is None or owner is None or batch["status"] in TERMINAL:
            return
        if batch["status"] == "validating":
            batch = await self._validate(batch_id, batch)
            if batch["status"] == "failed":
                return
        wake = self._wake[batch_id]
        pending = await self.store.pending_lines(batch_id)
        if batch["status"] == "in_progress" and pending:
            self._unstarted[batch_id] = len(pending)
            try:
                start = await self._plan(batch_id, batch, len(pending))
                while self.clock.now() < start and not wake.is_set():
                    await self.clock.sleep_until(start, wake)
                await self._send_lines(batch_id, batch, owner, pending, wake)
            finally:
                del self._unstarted[batch_id]
        await self._finish(batch_id, batch["expires_at"])

    async def _validate(self, batch_id: str, batch: dict[str, Any]) -> dict[str, Any]:
        """Check the input file (in a thread: a large file must not stall the listener),
        then store its lines and go in_progress, or fail with every bad line in errors.data,
        as OpenAI does. After a crash mid-check, the check runs again."""
        owner = await self.store.owner_of(batch_id)
        assert owner is not None
        content = await self.store.file_content(batch["input_file_id"], owner[0])
        if content is None:
            gone = "the input file was deleted before it was checked"
            parsed = Parsed(errors=[{"code": "invalid_file", "message": gone, "param": "input_file_id", "line": None}])
        else:
            parsed = await asyncio.to_thread(parse_input, content, batch["endpoint"], self.settings.max_lines)
        async with self._locks.setdefault(batch_id, asyncio.Lock()):
            current = await self.store.batch(batch_id)
            assert current is not None
            now = int(self.clock.now())
            if current["status"] != "validating":  # cancelled while it was checked: no lines
                return current
            if parsed.errors:
                current.update(status="failed", failed_at=now, errors={"object": "list", "data": parsed.errors})
                await self.store.save_batch(current, ended_at=now)
                return current
            current.update(status="in_progress", in_progress_at=now)
            current["request_counts"]["total"] = len(parsed.lines)
            await self.store.add_lines(current, parsed.lines)
            return current

    async def _plan(self, batch_id: str, batch: dict[str, Any], lines: int) -> float:
        now = self.clock.now()
        deadline = float(batch["expires_at"])
        duration = lines * self.seconds_per_line / self.settings.max_concurrency
        chosen = plan(self.forecast(now, deadline - now), now, deadline, duration, self.settings.safety_margin_seconds)

        def note(b: dict[str, Any]) -> None:
            b["carbon"]["planned_start_at"] = int(chosen.start_unix)
            b["carbon"]["planned_g_per_kwh"] = round(chosen.mean_g_per_kwh, 3)

        await self.update(batch_id, note)
        return chosen.start_unix

    async def _send_lines(self, batch_id: str, batch: dict[str, Any], owner: tuple[str, str], pending: list[Line], wake: asyncio.Event) -> None:
        deadline = float(batch["expires_at"])
        submitted = float(batch["carbon"]["submitted_g_per_kwh"])
        running: set[asyncio.Task[None]] = set()
        for line in pending:
            await self._admission(wake)
            if wake.is_set() or self.clock.now() >= deadline:
                break  # cancelled, or the deadline passed: the rest does not start
            self._started(1)  # counted now: the next admission sees it
            self._unstarted[batch_id] -= 1
            task = asyncio.create_task(self._one(batch_id, batch["endpoint"], owner, line, submitted))
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running, return_exceptions=True)

    @property
    def lines_deferred(self) -> int:
        """Lines of running batches not started yet: waiting for their window or for room."""
        return sum(self._unstarted.values())

    def is_line(self, request_id: str) -> bool:
        """A request the runner sent: `<batch id>-<line>` of a batch it is running (batch
        ids are random, so a client cannot pass its own requests off as lines)."""
        batch_id, _, line_no = request_id.rpartition("-")
        return line_no.isdigit() and batch_id in self._tasks

    def allowed_lines(self) -> int:
        """Lines that may be in flight now: the cap, or the latency guard's (0: paused)."""
        if self.guard is not None:
            return min(self.settings.max_concurrency, self.guard.allowed_lines())
        return self.settings.max_concurrency

    async def _admission(self, wake: asyncio.Event) -> None:
        """Wait for room under the line limit and for interactive traffic to allow a line."""
        crowd = self.settings.yield_above_in_flight
        while not wake.is_set():
            crowded = crowd and self._interactive() - self.lines_in_flight > crowd
            if not crowded and self.lines_in_flight < self.allowed_lines():
                return
            self._line_ended.clear()
            try:  # a line ending frees room at once; the guard and the crowd are polled
                await asyncio.wait_for(self._line_ended.wait(), 0.05)
            except asyncio.TimeoutError:
                pass

    def _started(self, change: int) -> None:
        self.lines_in_flight += change
        if self.guard is not None:
            self.guard.lines_changed(self.lines_in_flight)
        if change < 0:
            self._line_ended.set()

    async def _one(self, batch_id: str, endpoint: str, owner: tuple[str, str], line: Line, submitted_g_per_kwh: float) -> None:
        began = self.clock.now()  # the clock the plan is made in (a bench compresses it)
        request_id = f"{batch_id}-{line.line_no}"
        try:
            try:
                answer: Answer | None = await self.sender.send(endpoint, line.body, owner[0], owner[1], request_id)
                failure = None
            except Exception as exc:
                answer, failure = None, str(exc)
            result = _result(line, answer, failure, request_id, self.clock.now(), submitted_g_per_kwh)
            if await self.store.add_result(batch_id, result):
                self._on_line("completed" if result.ok else "failed")
            # Lines overlap max_concurrency at a time: one line's share of the clock.
            self.seconds_per_line = 0.8 * self.seconds_per_line + 0.2 * max(0.0, self.clock.now() - began)
        finally:
            self._started(-1)

    async def _finish(self, batch_id: str, expires_at: float) -> None:
        """Write the output and error files, then end the batch (cancelled, expired or completed)."""
        batch = await self.store.batch(batch_id)
        assert batch is not None
        cancelled = batch["status"] == "cancelling"
        pending = await self.store.pending_lines(batch_id)
        now = self.clock.now()
        if pending and not cancelled and now < expires_at:
            return  # stopped early (an error): resumes at the next start
        if pending and not cancelled:
            expired = [_expired(line, now) for line in pending]
            await self.store.add_results(batch_id, expired)
            for _ in expired:
                self._on_line("expired")
        if cancelled:
            for _ in pending:
                self._on_line("cancelled")
        await self.update(batch_id, lambda b: b.update(status="finalizing", finalizing_at=b.get("finalizing_at") or int(now)))
        results = await self._settled(batch_id, await self.store.results(batch_id), float(batch["carbon"]["submitted_g_per_kwh"]))
        owner = await self.store.owner_of(batch_id)
        assert owner is not None
        output = b"".join(r.record + b"\n" for r in results if r.ok)
        errors = b"".join(r.record + b"\n" for r in results if not r.ok)
        output_id = await self._write_file(owner[0], f"{batch_id}_output.jsonl", output) if output else None
        error_id = await self._write_file(owner[0], f"{batch_id}_error.jsonl", errors) if errors else None
        emitted = sum(r.grams for r in results)
        run_now = sum(r.counterfactual_grams for r in results)
        final = "cancelled" if cancelled else ("expired" if pending else "completed")
        ran = any(r.receipt_id for r in results)

        def end(b: dict[str, Any]) -> None:
            b.update(status=final, output_file_id=output_id, error_file_id=error_id)
            b[f"{final}_at"] = int(now)
            b["request_counts"] = {
                "total": b["request_counts"]["total"],
                "completed": sum(1 for r in results if r.ok),
                "failed": sum(1 for r in results if not r.ok),
            }
            b["carbon"].update(
                emitted_grams=round(emitted, 9), run_now_grams=round(run_now, 9), avoided_grams=round(run_now - emitted, 9)
            )
            if ran:
                b["carbon"]["seconds_per_line"] = round(self.seconds_per_line, 6)  # the next start plans from it

        await self.update(batch_id, end, ended=True)
        await self.store.forget_lines(batch_id)
        self._on_avoided(run_now - emitted)

    async def _settled(self, batch_id: str, results: list[Result], submitted_g_per_kwh: float) -> list[Result]:
        """Replace the figures of the response headers by the receipts' settled ones."""
        if self._receipt_grams is None:
            return results
        settled: list[Result] = []
        waited_until = time.monotonic() + SETTLE_WAIT_SECONDS
        for r in results:
            figures = await self._receipt_grams(r.receipt_id) if r.receipt_id else None
            while figures is not None and not figures[3] and time.monotonic() < waited_until:
                await asyncio.sleep(0.05)  # provisional: the next meter sample settles it
                figures = await self._receipt_grams(r.receipt_id) if r.receipt_id else None
            if figures is not None:
                operational, embodied, g_per_kwh, _ = figures
                grams = operational + embodied
                counterfactual = embodied + (operational * submitted_g_per_kwh / g_per_kwh if g_per_kwh > 0 else operational)
                r = Result(r.line_no, r.ok, r.record, r.ran_at, grams, counterfactual, r.receipt_id)
            settled.append(r)
        return settled

    async def _write_file(self, owner: str, filename: str, content: bytes) -> str:
        # One id per batch and kind: finalizing again after a crash replaces the file.
        file = StoredFile(derived_id("file", filename), owner, "batch_output", filename, len(content), int(self.clock.now()))
        await self.store.add_file(file, content)
        return file.id


def _result(line: Line, answer: Answer | None, failure: str | None, request_id: str, now: float, submitted: float) -> Result:
    record: dict[str, Any] = {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": line.custom_id}
    if answer is None:
        record.update(response=None, error={"code": "request_failed", "message": failure or "the request failed"})
        return Result(line.line_no, False, orjson.dumps(record), now, 0.0, 0.0)
    try:
        body: Any = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        body = answer.body.decode("utf-8", "replace")
    headers = {k.lower(): v for k, v in answer.headers.items()}
    record["response"] = {"status_code": answer.status, "request_id": headers.get("x-request-id", request_id), "body": body}
    record["error"] = None
    grams = _number(headers.get("x-co2e-grams"))
    embodied = _number(headers.get("x-co2e-embodied-grams"))
    g_per_kwh = _number(headers.get("x-carbon-intensity"))
    operational = max(0.0, grams - embodied)
    counterfactual = embodied + (operational * submitted / g_per_kwh if g_per_kwh > 0 else operational)
    ok = 200 <= answer.status < 300
    return Result(line.line_no, ok, orjson.dumps(record), now, grams, counterfactual, headers.get("x-carbon-receipt-id"))


def _expired(line: Line, now: float) -> Result:
    record = {
        "id": f"batch_req_{secrets.token_hex(12)}",
        "custom_id": line.custom_id,
        "response": None,
        "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."},
    }
    return Result(line.line_no, False, orjson.dumps(record), now, 0.0, 0.0)


def _number(text: str | None) -> float:
    try:
        return float(text) if text else 0.0
    except ValueError:
        return 0.0
