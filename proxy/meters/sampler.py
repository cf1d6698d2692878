"""Polls a meter on a fixed period and hands good samples to a consumer.

A meter that raises, hangs or returns garbage never stops the proxy: the sampler
records the failure (health, last error, staleness) and tries again next period.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

from proxy.meters.base import EnergySample, Meter, MeterError
from proxy.tasks import cancel_and_wait

log = logging.getLogger("carbon_proxy.meter")


@dataclass(slots=True)
class MeterHealth:
    ok: bool = False
    last_success_monotonic: float | None = None
    consecutive_failures: int = 0
    total_failures: int = 0
    samples: int = 0
    last_error: str | None = None
    sample_seconds: float = 0.0
    """Wall time the last read took (meter cost and latency)."""

    def staleness_seconds(self, now: float | None = None) -> float | None:
        if self.last_success_monotonic is None:
            return None
        return (now if now is not None else time.monotonic()) - self.last_success_monotonic


class Sampler:
    def __init__(self, meter: Meter, consumer: Callable[[EnergySample], None], interval_seconds: float) -> None:
        self.meter = meter
        self._consumer = consumer
        self._interval = interval_seconds
        # A read slower than a few periods is a hang: give up on it and report.
        self._read_timeout = max(1.0, 5 * interval_seconds)
        self.health = MeterHealth()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._last: EnergySample | None = None

    @property
    def last_sample(self) -> EnergySample | None:
        """The latest good reading (per-device joules and power), for metrics; read-only."""
        return self._last

    def basis(self) -> str:
        """The `meter=...` part of X-Emissions-Basis, with a flag when the figures are doubtful."""
        text = f"meter={self.meter.kind}"
        if self.meter.method != "measured":
            text += f"; method={self.meter.method}"
        if not self.health.ok:
            text += "; meter_status=down" if self.health.samples else "; meter_status=starting"
        return text

    async def start(self) -> None:
        # Two samples before serving, so that the first request already has a recent power
        # reading to estimate its provisional figures from.
        await self.sample_once()
        await asyncio.sleep(self._interval)
        await self.sample_once()
        self._task = asyncio.create_task(self._run(), name="meter-sampler")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._closed:
            next_at += self._interval
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (a slow read): skip ahead rather than burst
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)
            await self.sample_once()

    async def sample_once(self) -> None:
        started = time.monotonic()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancel of
            # close() when the read completes at the same moment (CPython gh-86296).
            async with asyncio.timeout(self._read_timeout):
                sample = await self.meter.read()
            self._check(sample)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any meter failure is reported, never raised
            self._failed(exc)
            return
        self.health.sample_seconds = time.monotonic() - started
        self._last = sample
        try:
            self._consumer(sample)
        except Exception:
            log.exception("attribution failed on a meter sample")
            return
        health = self.health
        if not health.ok:
            log.info("meter %s is reading (%d devices)", self.meter.kind, len(sample.joules_by_device))
        health.ok = True
        health.samples += 1
        health.consecutive_failures = 0
        health.last_success_monotonic = time.monotonic()
        health.last_error = None

    def _check(self, sample: EnergySample) -> None:
        if not isinstance(sample, EnergySample):
            raise MeterError(f"meter returned {type(sample).__name__}, not an EnergySample")
        for device, joules in sample.joules_by_device.items():
            if not isinstance(joules, (int, float)) or not math.isfinite(joules) or joules < 0:
                raise MeterError(f"device {device}: invalid energy reading {joules!r}")
        last = self._last
        if last is not None:
            if sample.timestamp_seconds < last.timestamp_seconds:
                raise MeterError("meter timestamp went backwards")
            for device, joules in sample.joules_by_device.items():
                before = last.joules_by_device.get(device)
                if before is not None and joules < before:
                    raise MeterError(f"device {device}: cumulative energy went backwards ({before:.3f} -> {joules:.3f} J)")

    def _failed(self, exc: BaseException) -> None:
        health = self.health
        message = "read timed out" if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else str(exc) or type(exc).__name__
        if health.ok or health.last_error != message:
            log.warning("meter %s failed: %s", self.meter.kind, message)
        health.ok = False
        health.consecutive_failures += 1
        health.total_failures += 1
        health.last_error = message
