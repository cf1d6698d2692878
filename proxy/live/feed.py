"""One broadcaster for every open live page.

Receipts arrive through `ProxyServer.on_record` (a cheap append on the request's path);
a single task wakes a few times a second, turns what arrived into one server-sent event
and offers the same bytes to every client. Each client has a small bounded queue: one
that cannot keep up is dropped (its browser reconnects and starts from a fresh
snapshot) rather than letting memory grow or slowing the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any, Callable, Iterable

import orjson

from proxy.accounting import Figures
from proxy.app import ProxyServer
from proxy.exchange import MeteredExchange
from proxy.live.state import PowerTracker, snapshot
from proxy.live.window import HourWindow
from proxy.receipts.model import Receipt

log = logging.getLogger("carbon_proxy.live")

FLUSH_SECONDS = 0.25
"""Request rows go out at most this often, batched: 4 events a second whatever the load."""
STATE_SECONDS = 2.0
RECENT_ROWS = 50
"""Rows a new page starts with, and the most one batch carries."""
CLIENT_QUEUE_EVENTS = 32
"""About 8 s of events: a client this far behind is dropped."""
MAX_CLIENTS = 64
MODEL_MAX_CHARS = 100


def request_row(receipt: Receipt, tenant_label: Callable[[str], str]) -> dict[str, Any]:
    """The receipt's non-secret fields the page shows. The tenant goes through the
    metrics' label rule: allow-listed names, else 'other' (never a credential-hash prefix)."""
    model = receipt.model[:MODEL_MAX_CHARS] if receipt.model else None
    return {
        "id": receipt.receipt_id,
        "finished_unix": receipt.finished_unix,
        "model": model,
        "upstream": receipt.upstream,
        "tenant": tenant_label(receipt.tenant),
        "prompt_tokens": receipt.prompt_tokens,
        "output_tokens": receipt.output_tokens,
        "images": receipt.images,
        "energy_joules": receipt.energy_joules,
        "co2e_grams": receipt.co2e_grams,
        "embodied_grams": receipt.embodied_grams,
        "status_code": receipt.status_code,
        "outcome": receipt.outcome,
        "status": receipt.status,
        "duration_seconds": receipt.duration_seconds,
    }


def sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class Client:
    __slots__ = ("queue", "dropped", "transport")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(CLIENT_QUEUE_EVENTS)
        self.dropped = False
        self.transport: asyncio.BaseTransport | None = None
        """The page's connection, set by the stream handler."""

    def offer(self, event: bytes) -> bool:
        try:
            self.queue.put_nowait(event)
            return True
        except asyncio.QueueFull:
            return False

    def end(self, *, cut: bool) -> None:
        """Wake the client's handler with the end marker, making room for it if needed.
        `cut`: also abort the connection, as a handler stuck writing to a peer that
        stopped reading would otherwise wait for as long as TCP keeps it open."""
        self.dropped = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)
        transport = self.transport
        if cut and isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.abort()

    def behind(self) -> bool:
        """Bytes still waiting in the socket buffer for this page to read."""
        transport = self.transport
        return isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size() > 0


class LiveFeed:
    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy
        self._tenant_label = proxy.tenancy.label
        self.window = HourWindow()
        self.power = PowerTracker()
        self.recent: deque[Receipt] = deque(maxlen=RECENT_ROWS)
        self._pending: dict[str, Receipt] = {}
        self.clients: set[Client] = set()
        self.dropped_clients = 0
        self._task: asyncio.Task[None] | None = None
        self._state: dict[str, Any] | None = None
        self._closed = False
        proxy.on_record(self.on_record)

    # -- the request path: keep it to a dict and an append ------------------------------

    def on_record(self, receipt: Receipt, figures: Figures | None, exchange: MeteredExchange | None = None) -> None:
        if receipt.status == "final":
            # Counted once, on the settled figure (as the metrics count energy and CO2e).
            tokens = (receipt.prompt_tokens or 0) + (receipt.output_tokens or 0)
            self.window.add(receipt.finished_unix, receipt.energy_joules, receipt.co2e_grams, tokens)
        # Rows are built only for pages that are open (in the broadcaster), not here.
        self.recent.append(receipt)
        if self.clients:
            self._pending.pop(receipt.request_id, None)  # the final receipt replaces its provisional one
            self._pending[receipt.request_id] = receipt
            while len(self._pending) > RECENT_ROWS:
                self._pending.pop(next(iter(self._pending)))

    def rows(self, receipts: Iterable[Receipt]) -> list[dict[str, Any]]:
        """The newest version of each request, in arrival order."""
        latest = {receipt.request_id: receipt for receipt in receipts}
        return [request_row(receipt, self._tenant_label) for receipt in latest.values()]

    # -- clients ----------------------------------------------------------------------

    def hello(self) -> bytes:
        """What a new page starts from: the latest rows, the hour and the state."""
        rows = self.rows(self.recent)
        state = self._state if self._state is not None else snapshot(self.proxy, self.power)
        return sse("hello", {"requests": rows, "hour": self.window.summary(), "state": state}) + b"retry: 3000\n\n"

    def subscribe(self) -> Client | None:
        if self._closed or len(self.clients) >= MAX_CLIENTS:
            return None
        client = Client()
        self.clients.add(client)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="live-feed")
        return client

    def unsubscribe(self, client: Client) -> None:
        self.clients.discard(client)

    def _broadcast(self, event: bytes) -> None:
        for client in list(self.clients):
            if not client.offer(event):
                self.clients.discard(client)
                self.dropped_clients += 1
                client.end(cut=True)
                log.info("live page: dropped a client that fell %d events behind", CLIENT_QUEUE_EVENTS)

    async def _run(self) -> None:
        """Runs while someone watches; stops with the last client."""
        next_state = 0.0
        while self.clients and not self._closed:
            try:
                if self._pending:
                    pending, self._pending = list(self._pending.values()), {}
                    self._broadcast(sse("requests", {"requests": self.rows(pending), "hour": self.window.summary()}))
                now = time.monotonic()
                if now >= next_state:
                    next_state = now + STATE_SECONDS
                    self._state = snapshot(self.proxy, self.power)
                    self._broadcast(sse("state", {"state": self._state, "hour": self.window.summary()}))
            except Exception:
                log.exception("live page broadcaster failed; retrying")
            await asyncio.sleep(FLUSH_SECONDS)
        self._pending = {}

    async def close(self) -> None:
        """Admin listener shutting down: end every stream so the drain does not wait on them."""
        self._closed = True
        for client in list(self.clients):
            client.end(cut=client.behind())  # the others finish their last write and end cleanly
        self.clients.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
