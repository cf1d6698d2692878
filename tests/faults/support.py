"""Shared by the fault-injection tests: a proxy whose receipts are counted, a raw TCP
upstream that can misbehave below HTTP, and the checks a user would make after a fault:
the error is clean JSON, the proxy still serves, each request has one receipt, and no
joule is lost or counted twice."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import aiohttp
import orjson
from helpers import FakeMeter, proxy_config

from proxy.carbon.intensity import ConstantIntensity, IntensityProvider
from proxy.config import config_from_dict
from proxy.receipts.model import MemoryReceiptStore, Receipt, ReceiptStore
from proxy.serve import Service

CHAT = "/v1/chat/completions"
SSE_EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'


def sse_event(i: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % i


def completion_body(prompt: int = 5, completion: int = 7) -> bytes:
    return orjson.dumps(
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    )


# -- receipts: count every put ----------------------------------------------------------


class CountingStore(MemoryReceiptStore):
    """MemoryReceiptStore that remembers every put: (request_id, status, outcome)."""

    def __init__(self) -> None:
        super().__init__()
        self.puts: list[tuple[str, str, str]] = []

    def put(self, receipt: Receipt) -> None:
        self.puts.append((receipt.request_id, receipt.status, receipt.outcome))
        super().put(receipt)

    @property
    def receipts(self) -> dict[str, Receipt]:
        """By the client's request id (the tests send distinct ones)."""
        return {r.request_id: r for r in self._receipts.values()}


# -- the proxy under test --------------------------------------------------------------


@dataclass
class Proxy:
    service: Service
    store: Any
    meter: Any
    session: aiohttp.ClientSession
    request_ids: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.service.public_port}"

    @property
    def engine(self) -> Any:
        assert self.service.proxy.accountant is not None
        return self.service.proxy.accountant.engine

    closed: bool = False

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.session.close()
            await self.service.stop()


async def start(
    upstream_url: str,
    *,
    meter: Any = None,
    store: Any = None,
    intensity: IntensityProvider | None = None,
    **overrides: Any,
) -> Proxy:
    overrides.setdefault("meter", {"interval_ms": 20})
    meter = meter or FakeMeter()
    store = store if store is not None else CountingStore()
    service = Service(
        config_from_dict(proxy_config(upstream_url, **overrides)),
        meter=meter,
        intensity=intensity or ConstantIntensity(450),
        receipts=store,
    )
    await service.start()
    return Proxy(service, store, meter, aiohttp.ClientSession())


async def post(proxy: Proxy, path: str, payload: dict[str, Any], **kwargs: Any) -> tuple[int, bytes, Any]:
    async with proxy.session.post(proxy.base + path, json=payload, **kwargs) as response:
        body = await response.read()
        if "X-Request-Id" in response.headers:
            proxy.request_ids.append(response.headers["X-Request-Id"])
        return response.status, body, response.headers


async def assert_clean_json_error(response_status: int, body: bytes, status: int, kind: str) -> dict[str, Any]:
    assert response_status == status, body
    data = orjson.loads(body)
    assert data["error"]["type"] == kind, data
    assert data["error"]["code"] == status
    assert "Traceback" not in body.decode("utf-8", "replace")
    return data


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def by_request_id(store: ReceiptStore, request_id: str) -> Receipt | None:
    """The most recent receipt of a client request id sent without a credential."""
    found = await store.find(None, request_id, 1)
    return found[0] if found else None


async def settled(proxy: Proxy, request_ids: Sequence[str], timeout: float = 5.0) -> dict[str, Receipt]:
    """Wait until every request's receipt is final and return them. With a CountingStore,
    also check each was recorded once: one provisional put, one final put, one outcome."""
    store = proxy.store
    deadline = time.monotonic() + timeout
    while True:
        receipts = {rid: await by_request_id(store, rid) for rid in request_ids}
        waiting = [rid for rid, r in receipts.items() if r is None or r.status != "final"]
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(waiting)} of {len(request_ids)} receipts not final: {waiting[:3]}")
        await asyncio.sleep(0.02)
    if isinstance(store, CountingStore):
        wanted = set(request_ids)
        counts = Counter((rid, status) for rid, status, _ in store.puts if rid in wanted)
        for rid in request_ids:
            assert counts[(rid, "provisional")] == 1, (rid, counts)
            assert counts[(rid, "final")] == 1, (rid, counts)
            outcomes = {outcome for r, _, outcome in store.puts if r == rid}
            assert len(outcomes) == 1, (rid, outcomes)  # the outcome never changes once recorded
    return receipts  # type: ignore[return-value]


def assert_conserved(proxy: Proxy, receipts: dict[str, Receipt]) -> None:
    """DESIGN 5: once every request is final, receipts' energy + idle == measured (0.1%),
    and attribution credited exactly what the receipts say (nothing lost, nothing twice).
    `receipts` must be every request the proxy metered."""
    assert all(r.status == "final" for r in receipts.values()), [r.request_id for r in receipts.values() if r.status != "final"]
    if isinstance(proxy.store, CountingStore):
        assert set(receipts) == set(proxy.store.receipts), "a receipt exists for a request the test did not send"
    totals = proxy.engine.totals()
    measured = sum(t.measured_joules for t in totals.values())
    idle = sum(t.idle_joules for t in totals.values())
    attributed = sum(t.attributed_joules for t in totals.values())
    requests = sum(r.energy_joules for r in receipts.values())
    assert measured > 0
    assert abs(requests - attributed) <= 1e-6 * measured, (requests, attributed)
    assert abs(requests + idle - measured) <= 1e-3 * measured, (requests, idle, measured)


async def check_still_serves(proxy: Proxy, path: str = CHAT, payload: dict[str, Any] | None = None) -> None:
    """After the fault: a normal request through the same proxy and upstream works."""
    payload = payload or {"model": "m", "messages": []}
    status, body, headers = await post(proxy, path, payload)
    assert status == 200, body
    if payload.get("stream"):
        assert body.endswith(b"data: [DONE]\n\n") and b"\n\n: emissions {" in body, body[-300:]
    else:
        assert float(headers["X-Energy-Joules"]) >= 0
        assert "status=" in headers["X-Emissions-Basis"]


# -- a raw TCP upstream: HTTP/1.1 by hand, so it can break the protocol --------------


Step = bytes | float | str
"""bytes: write them; float: sleep that long; "reset": RST the connection; "close": FIN;
"hang": wait until the test ends."""

Script = Callable[[bytes, bytes], Sequence[Step]]
"""(request head, request body) -> steps for that request."""


class RawUpstream:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._release = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "RawUpstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:  # keep-alive: one script per request on this connection
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head)
                for step in self.script(head, body):
                    if isinstance(step, bytes):
                        writer.write(step)
                        await writer.drain()
                    elif isinstance(step, float):
                        await asyncio.sleep(step)
                    elif step == "reset":
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        writer.transport.abort()
                        return
                    elif step == "close":
                        writer.close()
                        return
                    elif step == "hang":
                        await self._release.wait()
                        writer.close()
                        return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if not writer.is_closing():
                writer.close()


def response_head(status: str = "200 OK", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def ok_json(body: bytes | None = None) -> list[Step]:
    body = body if body is not None else completion_body()
    return [response_head(headers={"Content-Type": "application/json", "Content-Length": str(len(body))}) + body]


def ok_sse(events: int = 3) -> list[Step]:
    head = response_head(headers={"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"})
    return [head] + [chunk(sse_event(i)) for i in range(events)] + [chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"]


async def gather_limited(calls: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    return await asyncio.gather(*(c() for c in calls))
