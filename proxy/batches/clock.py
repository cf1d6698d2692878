"""Time for the batch runner: the wall clock, or a manual one that tests move by hand."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep_until(self, unix: float, wake: asyncio.Event) -> None:
        """Return at `unix`, or earlier when `wake` is set (a cancel, a new batch, stop)."""
        ...


class WallClock:
    max_nap_seconds = 60.0
    """Naps are short so a suspended host (or a moved clock) is noticed within a minute."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, unix: float, wake: asyncio.Event) -> None:
        delay = min(self.max_nap_seconds, unix - time.time())
        if delay <= 0:
            return
        try:
            await asyncio.wait_for(wake.wait(), delay)
        except asyncio.TimeoutError:
            pass


class ManualClock:
    """Stands still until `advance` or `set` moves it: a day of scheduling in a test."""

    def __init__(self, start_unix: float) -> None:
        self._now = start_unix
        self._moved = asyncio.Event()

    def now(self) -> float:
        return self._now

    def set(self, unix: float) -> None:
        self._now = max(self._now, unix)
        self._moved.set()
        self._moved = asyncio.Event()

    def advance(self, seconds: float) -> None:
        self.set(self._now + seconds)

    async def sleep_until(self, unix: float, wake: asyncio.Event) -> None:
        if self._now >= unix or wake.is_set():
            return
        moved = asyncio.ensure_future(self._moved.wait())
        woken = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({moved, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            moved.cancel()
            woken.cancel()
