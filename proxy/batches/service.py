"""Wiring the Batch API into a running proxy: store, runner, endpoints, metrics.

`install_batches(service)` is called by proxy.serve.Service before the public listener
opens (the endpoints must answer from the first request); `start(port)` once it is bound
(lines are sent to it); `close()` before it drains.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry

from proxy.batches.clock import Clock, WallClock
from proxy.batches.endpoint import BatchApi
from proxy.batches.latency_guard import LatencyGuard
from proxy.batches.metrics import BatchMetrics
from proxy.batches.runner import BatchRunner
from proxy.batches.sender import BatchIdentity, LineSender
from proxy.batches.settings import BatchSettings, open_store
from proxy.batches.store_base import BatchStoreLike
from proxy.header_guard import where
from proxy.carbon.forecast import ForecastSource, ForecastWindow, forecast_of

RETENTION_SWEEP_SECONDS = 3600.0
log = logging.getLogger("carbon_proxy")


class BatchService:
    def __init__(
        self, proxy: Any, settings: BatchSettings, registry: CollectorRegistry | None, clock: Clock | None = None, forecast: ForecastSource | None = None
    ) -> None:
        self.proxy = proxy
        self.settings = settings
        self.clock: Clock = clock or WallClock()
        self._forecast_source = forecast
        self.identity = BatchIdentity()
        self.store: BatchStoreLike = open_store(settings)
        self._takeover: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.guard = (
            LatencyGuard(
                settings.max_concurrency,
                settings.interactive_latency_window_seconds,
                settings.interactive_latency_objective_seconds,
                settings.interactive_latency_objective_ratio,
            )
            if settings.latency_guarded
            else None
        )
        self.metrics = BatchMetrics()
        if registry is not None:
            registry.register(self.metrics)
        self.runner = BatchRunner(
            self.store,
            settings,
            LineSender(self.identity, "127.0.0.1", 0),
            self._forecast,
            self.clock,
            interactive_in_flight=lambda: int(proxy.in_flight),
            receipt_grams=self._receipt_grams,
            on_line=self.metrics.line_ended,
            on_avoided=self.metrics.batch_avoided,
            guard=self.guard,
        )
        self.metrics.runner = self.runner
        if self.guard is not None:
            proxy.on_record(self._observe)
        self.api = BatchApi(self.store, self.runner, settings, self.clock, self._intensity_now)
        proxy.internal_identity = self.identity.vouched
        for endpoint in self.api.endpoints():
            proxy.add_local(endpoint)

    def _forecast(self, now_unix: float, horizon_seconds: float) -> list[ForecastWindow]:
        if self._forecast_source is not None:
            return self._forecast_source.forecast(now_unix, horizon_seconds) or forecast_of(self.proxy.intensity, now_unix, horizon_seconds)
        return forecast_of(self.proxy.intensity, now_unix, horizon_seconds)

    def _observe(self, receipt: Any, figures: Any, exchange: Any) -> None:
        """Every receipt record (the proxy's hook): interactive latency for the guard."""
        assert self.guard is not None
        latency = receipt.time_to_first_byte_seconds if receipt.outcome == "ok" else None
        self.guard.observe(receipt.receipt_id, receipt.upstream, latency, self.runner.is_line(receipt.request_id))

    def _intensity_now(self) -> float:
        return float(self.proxy.intensity.at(self.clock.now()).g_per_kwh)

    async def _receipt_grams(self, receipt_id: str) -> tuple[float, float, float, bool] | None:
        try:
            receipt = await self.proxy.receipts.get(receipt_id)
        except Exception:
            return None  # the figures of the response headers stand
        if receipt is None:
            return None
        return receipt.operational_grams, receipt.embodied_grams, receipt.intensity_g_per_kwh, receipt.status != "provisional"

    async def open(self) -> None:
        """Before the listener opens: the endpoints answer from the first request."""
        await self.store.start()

    async def start(self, host: str, port: int) -> None:
        """Once the listener is bound: lines are sent to it; unfinished batches resume."""
        self.runner.sender = LineSender(self.identity, _loopback(host), port)
        await self.runner.start()
        self._sweeper = asyncio.create_task(self._sweep())
        if self.store.shared:
            self._takeover = asyncio.create_task(self._take_over())

    async def _take_over(self) -> None:
        """In a fleet: run batches that no replica holds (new through another replica whose
        lease lapsed, or whose replica died: they resume from their results)."""
        while True:
            await asyncio.sleep(float(getattr(self.store, "lease_seconds", 30.0)) / 2)
            try:
                # Only the unfinished ids (runner.start also reads every batch once, to learn).
                for batch_id in await self.store.unfinished():
                    self.runner.submit(batch_id)
            except Exception as exc:  # the database is down: try again at the next round
                log.warning("batch takeover check failed (%s)", where(exc))

    async def _sweep(self) -> None:
        while True:
            try:
                await self.store.expire(self.clock.now() - self.settings.retention_days * 86400)
            except Exception as exc:  # a full disk: try again at the next sweep
                log.warning("batch retention sweep failed (%s)", where(exc))
            await asyncio.sleep(RETENTION_SWEEP_SECONDS)

    async def close(self) -> None:
        for task in (self._sweeper, self._takeover):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.runner.close()
        await self.store.close()


def _loopback(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return f"[{host}]" if ":" in host else host
