"""The live page's routes on the admin listener: `/`, its assets, and the event stream.

The admin listener's bind address is the access control (as for /metrics): the page
carries only aggregates and receipts' non-secret fields, and never goes on the public port.
"""

from __future__ import annotations

import asyncio
from importlib import resources

import orjson
from aiohttp import web

from proxy.live.feed import LiveFeed
from proxy.live.state import snapshot

KEEPALIVE_SECONDS = 15.0
"""A comment line this often keeps idle intermediaries from closing the stream."""

ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
# Scripts and styles come from this origin only, and no inline script runs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
FEED_KEY = web.AppKey("live_feed", LiveFeed)


def _asset(name: str) -> bytes:
    return resources.files("proxy.live").joinpath("static", name).read_bytes()


def install_live(app: web.Application, feed: LiveFeed) -> None:
    """Add the live page to the admin app (read the assets now: a missing file fails at
    start-up, not on the first visit)."""
    page = _asset("index.html")
    assets = {name: (_asset(name), content_type) for name, content_type in ASSETS.items()}
    app[FEED_KEY] = feed

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS)

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        body, content_type = found
        return web.Response(body=body, content_type=content_type, headers=SECURITY_HEADERS)

    async def state(request: web.Request) -> web.Response:
        data = {"state": snapshot(feed.proxy, feed.power), "hour": feed.window.summary(), "requests": feed.rows(feed.recent)}
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    async def events(request: web.Request) -> web.StreamResponse:
        client = feed.subscribe()
        if client is None:
            return web.json_response({"error": {"message": "too many live pages open", "type": "unavailable", "code": 503}}, status=503)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        client.transport = request.transport
        try:
            await response.prepare(request)
            await response.write(feed.hello())
            while True:
                try:
                    event = await asyncio.wait_for(client.queue.get(), KEEPALIVE_SECONDS)
                except asyncio.TimeoutError:
                    event = b": keepalive\n\n"
                if event is None:  # dropped (too slow) or shutting down
                    break
                await response.write(event)
        except ConnectionError:
            pass  # the page was closed, or dropped for falling behind
        finally:
            feed.unsubscribe(client)
        return response

    async def close(app: web.Application) -> None:
        await feed.close()

    app.router.add_get("/", index)
    app.router.add_get("/live/events", events)
    app.router.add_get("/live/state", state)
    app.router.add_get("/live/{name}", asset)
    app.on_shutdown.append(close)
