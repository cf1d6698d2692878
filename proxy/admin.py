"""The admin listener: metrics, health and the live page, never on the public port."""

from __future__ import annotations

from typing import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.app import ProxyServer
from proxy.live import add_live_page

# Without a meter sample this recent, the figures are stale: not ready.
READY_STALENESS_SECONDS = 10.0


def receipts_check(store: object) -> dict[str, object]:
    """Ready while the receipts writer runs. A failing database (disk full) keeps the proxy
    ready: requests are served and receipts wait in memory; a dead writer loses them."""
    writer_up = getattr(store, "writer_up", True)  # stores without a writer thread: always
    return {
        "ok": bool(writer_up),
        "writer_up": bool(writer_up),
        "healthy": getattr(store, "healthy", True),
        "pending": getattr(store, "pending", 0),
        "error": getattr(store, "last_error", None),
    }


def create_admin_app(server: ProxyServer, registry: CollectorRegistry, upstreams_ok: Callable[[], Awaitable[dict[str, bool]]] | None = None) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        # Liveness: the event loop answers. Nothing else, so a meter outage never restarts us.
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def readyz(request: web.Request) -> web.Response:
        checks: dict[str, object] = {}
        sampler = server.sampler
        health = sampler.health if sampler is not None else None
        staleness = health.staleness_seconds() if health is not None else None
        meter_ok = health is not None and health.ok and staleness is not None and staleness < READY_STALENESS_SECONDS
        checks["meter"] = {"ok": meter_ok, "kind": server.meter.kind, "staleness_seconds": staleness, "error": health.last_error if health else None}
        upstreams = await upstreams_ok() if upstreams_ok is not None else {}
        checks["upstreams"] = upstreams
        receipts = receipts_check(server.receipts)
        checks["receipts"] = receipts
        ready = meter_ok and all(upstreams.values()) and bool(receipts["ok"])
        body = orjson.dumps({"status": "ready" if ready else "not_ready", "checks": checks})
        return web.Response(status=200 if ready else 503, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_live_page(app, server)  # GET /: the live page (proxy/live), admin listener only
    return app
