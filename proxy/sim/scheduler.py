"""The real-time loop that drives the batching engine: one task for all streams.

Every step, this loop writes the step's token to every stream itself (synchronously,
through each sequence's sink), so 2,000 streams cost one wake-up per step, not 2,000
task switches per token. Request handlers only wait for their sequence to end.

Steps are paced against a running deadline (step k starts when step k-1 was due to end),
so the CPU time spent writing does not slow the token rate. A loop that falls behind
(more streams than one core can write) runs steps back to back: every stream slows down
by the same factor, none bursts, and `lag_seconds_max` shows it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.sim.config import SimModelConfig
from proxy.sim.engine import BatchEngine, SimSequence
from proxy.sim.gpu import SimGpu
from proxy.tasks import cancel_and_wait

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.05
"""How often every in-flight client is checked; a stream that left stops within this."""


class Scheduler:
    def __init__(self, config: SimModelConfig, gpu: SimGpu) -> None:
        self.config = config
        self.gpu = gpu
        self.engine = BatchEngine(config, gpu)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.lag_seconds_max = 0.0
        """Worst lateness of a step start behind its deadline (CPU saturation shows here)."""

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-scheduler")

    async def close(self) -> None:
        """Stop the loop; every sequence still queued or running is cancelled."""
        now = self.gpu.now()
        for seq in list(self.engine.active_sequences()):
            self.engine.cancel(seq, now)
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def generate(self, seq: SimSequence) -> SimSequence:
        """Queue a sequence and wait until it finishes or is cancelled."""
        done: asyncio.Future[SimSequence] = asyncio.get_running_loop().create_future()

        def on_done(finished: SimSequence) -> None:
            if not done.done():
                done.set_result(finished)

        seq.on_done = on_done
        self.engine.submit(seq, self.gpu.now())
        self._wake.set()
        try:
            return await done
        except asyncio.CancelledError:
            self.engine.cancel(seq, self.gpu.now())
            raise

    async def _run(self) -> None:
        engine = self.engine
        clock = self.gpu.now
        deadline = time.monotonic()
        polled = deadline
        while True:
            if not engine.has_work():
                self._wake.clear()
                await self._wake.wait()
                deadline = time.monotonic()
            try:
                if time.monotonic() - polled >= DISCONNECT_POLL_SECONDS:
                    polled = time.monotonic()
                    engine.cancel_lost(clock())
                duration = engine.start_step(clock())
            except Exception:  # a bug must not hang every waiting handler
                log.exception("sim scheduler step failed; cancelling in-flight sequences")
                self._cancel_all()
                continue
            if duration is None:
                continue
            now = time.monotonic()
            self.lag_seconds_max = max(self.lag_seconds_max, now - deadline)
            # Owe at most one step: a loop that fell behind runs back to back, never bursts.
            deadline = max(deadline, now - duration) + duration
            await asyncio.sleep(max(0.0, deadline - now))
            try:
                engine.finish_step(clock())
            except Exception:
                log.exception("sim scheduler step failed; cancelling in-flight sequences")
                self._cancel_all()

    def _cancel_all(self) -> None:
        now = self.gpu.now()
        for seq in list(self.engine.active_sequences()):
            self.engine.cancel(seq, now)
