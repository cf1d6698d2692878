"""Run the proxy: both listeners, signals, graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.admin import create_admin_app
from proxy.app import ProxyServer
from proxy.build import build_embodied_rates, build_intensity, build_receipts, resolve_auto_meter
from proxy.carbon.intensity import IntensityProvider
from proxy.config import Config
from proxy.meters.base import Meter
from proxy.receipts.model import ReceiptStore
from proxy.server.connections import ConnectionGuard, ConnectionsCollector
from proxy.server.gc_tuning import tune_for_serving
from proxy.server.protocol import Limits
from proxy.server.public import PublicServer

log = logging.getLogger("carbon_proxy")


class UpstreamProbe:
    """Readiness: can we open a TCP connection to each upstream? Cached briefly so a
    probing orchestrator does not hammer the model servers."""

    def __init__(self, config: Config, cache_seconds: float = 2.0) -> None:
        self._targets = {}
        for upstream in config.upstreams:
            parts = urlsplit(upstream.url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            self._targets[upstream.name] = (parts.hostname or "127.0.0.1", port)
        self._cache_seconds = cache_seconds
        self._checked_at = 0.0
        self._status: dict[str, bool] = {}

    async def check(self) -> dict[str, bool]:
        if time.monotonic() - self._checked_at < self._cache_seconds:
            return self._status
        results = await asyncio.gather(*(self._reachable(host, port) for host, port in self._targets.values()))
        self._status = dict(zip(self._targets, results))
        self._checked_at = time.monotonic()
        return self._status

    @staticmethod
    async def _reachable(host: str, port: int) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        return True


class Service:
    """The proxy with its listeners. `start()` binds, `stop()` drains and flushes."""

    def __init__(
        self,
        config: Config,
        *,
        meter: Meter,
        intensity: IntensityProvider,
        receipts: ReceiptStore,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.proxy = ProxyServer(
            config, meter=meter, intensity=intensity, receipts=receipts, embodied_g_per_device_second=build_embodied_rates(config)
        )
        self.probe = UpstreamProbe(config)
        self.connections = ConnectionGuard(config.server.max_connections)
        self._public: PublicServer | None = None
        self._admin: web.AppRunner | None = None
        self.public_port: int = 0
        self.admin_port: int = 0
        self.tracer: Any = None
        """proxy.telemetry.tracer.RequestTracer when [telemetry] is configured."""
        self.batches: Any = None
        """proxy.batches.service.BatchService when [batches] is enabled."""
        self.batch_clock: Any = None
        self.batch_forecast: Any = None
        """Tests and the bench set these before start(): a manual clock, a scripted forecast."""

    async def start(self) -> None:
        await self.proxy.start()
        self._install_metrics()
        self._install_telemetry()
        await self._install_batches()
        server = self.config.server
        # The lean HTTP/1.1 server (proxy.server): no framework on the per-request path.
        limits = Limits(header_read_seconds=server.header_read_seconds, keepalive_seconds=server.keepalive_seconds)
        self._public = PublicServer(self.proxy.handle, guard=self.connections, limits=limits)
        self.public_port = await self._public.start(server.listen.host, server.listen.port)
        if self.batches is not None:
            await self.batches.start(server.listen.host, self.public_port)
        admin_app = create_admin_app(self.proxy, self.registry, upstreams_ok=self.probe.check)
        self._admin = web.AppRunner(admin_app, access_log=None, handle_signals=False)
        await self._admin.setup()
        await web.TCPSite(self._admin, server.admin_listen.host, server.admin_listen.port, reuse_address=True).start()
        self.admin_port = _bound_port(self._admin)

    def _install_metrics(self) -> None:
        try:
            from proxy.metrics import install_metrics
        except ImportError:
            return
        install_metrics(self.proxy, self.registry)
        self.registry.register(ConnectionsCollector(self.connections))

    def _install_telemetry(self) -> None:
        from proxy.telemetry import parse_telemetry  # imports no OpenTelemetry

        settings = parse_telemetry(self.config.telemetry)
        if settings is not None:
            from proxy.telemetry.tracer import install_tracing

            self.tracer = install_tracing(self.proxy, settings)

    async def _install_batches(self) -> None:
        from proxy.batches.settings import parse_batches, with_fleet

        settings = with_fleet(parse_batches(self.config.batches, self.config.receipts.path), self.config.receipts)
        if settings.enabled:
            from proxy.batches.service import BatchService

            self.batches = BatchService(self.proxy, settings, self.registry, self.batch_clock, self.batch_forecast)
            await self.batches.open()

    async def stop(self) -> None:
        """Stop accepting, let in-flight streams finish (up to drain_seconds), then flush."""
        if self.batches is not None:
            await self.batches.close()  # lines in flight run again at the next start
        loop = asyncio.get_running_loop()
        self.proxy.forwarder.drain_deadline = loop.time() + self.config.server.drain_seconds
        if self._public is not None:
            await self._public.stop(self.config.server.drain_seconds)
        await self.proxy.stop()
        if self._admin is not None:
            await self._admin.cleanup()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)  # flushes spans to the collector


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return 0


async def build_service(config: Config, registry: CollectorRegistry | None = None) -> Service:
    meter = await resolve_auto_meter(config)
    return Service(config, meter=meter, intensity=build_intensity(config), receipts=build_receipts(config), registry=registry)


async def run_until_signal(service: Service) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    tune_for_serving()
    log.info(
        "carbon-proxy listening on http://%s (admin http://%s)", service.config.server.listen, service.config.server.admin_listen
    )
    await stop.wait()
    log.info("draining in-flight requests (up to %g s)", service.config.server.drain_seconds)
    await service.stop()
