"""Shared by the hostile-input tests: a proxy with a real SQLite receipts file in front of a
real local upstream, a raw-socket client that can send any bytes, a raw upstream that can
answer with any bytes, and the check to run after every attack.

The check is what an operator would look at after an attacker has been at the proxy: the
next normal request is served, its receipt reaches the database file (read with sqlite3,
not through the store), the receipts writer is still alive, and no file descriptors or
asyncio tasks were left behind.

Other hostile tests (slow clients, per-tenant state, budgets) reuse `hostile_proxy`,
`raw_exchange` and `HostileProxy.after_attack`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web
from helpers import FakeMeter, proxy_config, start_upstream

from proxy.carbon.intensity import ConstantIntensity
from proxy.config import config_from_dict
from proxy.receipts.sqlite import SqliteReceiptStore
from proxy.serve import Service

CHAT = "/v1/chat/completions"
RECEIPTS = "/carbon-proxy/v1/receipts/"
FD_TOLERANCE = 6
"""Open descriptors may differ a little between two quiet moments (a pooled upstream
connection, the reader's SQLite handle); a leak per attack shows up well above this."""
TASK_TOLERANCE = 3


def completion_body(prompt: int = 5, completion: int = 7) -> bytes:
    return orjson.dumps(
        {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        }
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    """Resident memory now (not the peak): pages of a freed large buffer go back to the OS."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- a real upstream that records what it received -------------------------------------


@dataclass
class Recorder:
    """The upstream's view: raw body bytes and headers of every request it got."""

    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


def recording_routes(recorder: Recorder) -> dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    async def completion(request: web.Request) -> web.StreamResponse:
        recorder.bodies.append(await request.read())
        recorder.headers.append(dict(request.headers))
        payload = orjson.loads(recorder.bodies[-1]) if recorder.bodies[-1] else {}
        if isinstance(payload, dict) and payload.get("stream") is True:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(3):
                await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % i)
            await response.write(b"data: [DONE]\n\n")
            return response
        return web.Response(body=completion_body(), content_type="application/json")

    return {CHAT: completion, "/v1/completions": completion}


# -- the proxy under test ----------------------------------------------------------------


@dataclass
class HostileProxy:
    service: Service
    store: SqliteReceiptStore
    db_path: Path
    session: aiohttp.ClientSession
    upstream_url: str
    recorder: Recorder
    baseline_fds: int = 0
    baseline_tasks: int = 0

    @property
    def port(self) -> int:
        return self.service.public_port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.service.admin_port}"

    async def post(self, path: str, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        async with self.session.post(self.base + path, json=payload, headers=headers) as response:
            return response.status, await response.read(), response.headers

    def db_row(self, request_id: str) -> dict[str, Any] | None:
        """The receipt as it is in the database file, read like an operator would."""
        if not self.db_path.exists():
            return None
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        try:  # closed here: `with` on a sqlite3 connection only ends a transaction
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM receipts WHERE request_id = ?", (request_id,)).fetchone()
        finally:
            conn.close()
        return dict(row) if row is not None else None

    async def normal_request(self) -> str:
        """One ordinary completion; returns its request id once its receipt is on disk."""
        status, body, headers = await self.post(CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200, body
        assert float(headers["X-Energy-Joules"]) >= 0
        request_id = headers["X-Request-Id"]
        await until(lambda: self.db_row(request_id) is not None, 5.0, f"receipt {request_id} in {self.db_path}")
        return request_id

    async def settle_baseline(self) -> None:
        """Record fds and tasks at a quiet moment after one normal request (pools warm)."""
        await self.normal_request()
        await asyncio.sleep(0.05)
        self.baseline_fds = open_fds()
        self.baseline_tasks = len(asyncio.all_tasks())

    async def after_attack(self) -> None:
        """The proxy survived: it serves, its receipts reach the file, nothing leaked."""
        assert self.store._thread is not None and self.store._thread.is_alive(), "the receipts writer thread died"
        await self.normal_request()
        # Connections closed by the attack are released asynchronously: give them a moment.
        await until(lambda: open_fds() <= self.baseline_fds + FD_TOLERANCE, 3.0, f"open fds back near {self.baseline_fds} (now {open_fds()})")
        await until(
            lambda: len(asyncio.all_tasks()) <= self.baseline_tasks + TASK_TOLERANCE,
            3.0,
            f"asyncio tasks back near {self.baseline_tasks} (now {len(asyncio.all_tasks())})",
        )
        assert self.service.proxy.in_flight == 0

    async def close(self) -> None:
        await self.session.close()
        await self.service.stop()


async def start_hostile_proxy(tmp_path: Path, upstream_url: str, recorder: Recorder, **overrides: Any) -> HostileProxy:
    overrides.setdefault("meter", {"interval_ms": 20})
    db_path = tmp_path / "receipts.db"
    receipts = overrides.pop("receipts", {})
    data = proxy_config(upstream_url, **overrides)
    data["receipts"] = {**receipts, "path": str(db_path)}
    config = config_from_dict(data)
    store = SqliteReceiptStore(str(db_path), retention_days=config.receipts.retention_days, max_mb=config.receipts.max_mb)
    service = Service(config, meter=FakeMeter(), intensity=ConstantIntensity(450), receipts=store)
    await service.start()
    proxy = HostileProxy(service, store, db_path, aiohttp.ClientSession(), upstream_url, recorder)
    await proxy.settle_baseline()
    return proxy


async def start_recording_upstream() -> tuple[web.AppRunner, str, Recorder]:
    recorder = Recorder()
    runner, url = await start_upstream(recording_routes(recorder))
    return runner, url, recorder


# -- raw sockets: a client and an upstream that speak any bytes ---------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    body: bytes
    raw: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def parse_response(raw: bytes) -> RawResponse:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    body = rest
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(rest)
    elif "content-length" in headers:
        body = rest[: int(headers["content-length"])]
    return RawResponse(status, headers, body, raw)


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2 :]
    return b"".join(out)


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` as is, half-close, and return every byte the proxy answered until it
    closed the connection (send `Connection: close` to get one response)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the proxy neither answered nor closed within {timeout} s: {b''.join(chunks)[:200]!r}")
            chunk = await asyncio.wait_for(reader.read(65536), remaining)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


def request_bytes(method: str, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    """An HTTP/1.1 request, headers given as raw bytes (any bytes) and sent as they are."""
    lines = [method.encode() + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    if body:
        lines.append(b"Content-Type: application/json")
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def raw_request(port: int, method: str, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> RawResponse:
    return parse_response(await raw_exchange(port, request_bytes(method, path, headers, body)))


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """A TCP upstream that reads one request head and answers with whatever `answer` writes."""

    def __init__(self, answer: RawHandler) -> None:
        self._answer = answer
        self._server: asyncio.Server | None = None
        self.requests: list[bytes] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
