"""The live page on the admin listener (issue 18): requests as they settle, the last
hour's grams, power per device group, grid intensity and meter health, pushed over
server-sent events. Plain HTML, CSS and hand-drawn SVG: no CDN, no chart library."""

from __future__ import annotations

from aiohttp import web

from proxy.app import ProxyServer
from proxy.live.feed import LiveFeed
from proxy.live.routes import install_live


def add_live_page(app: web.Application, server: ProxyServer) -> LiveFeed:
    feed = LiveFeed(server)
    install_live(app, feed)
    return feed


__all__ = ["LiveFeed", "add_live_page"]
