"""Headless Chromium driven over the DevTools protocol (CDP), for the live page's tests.

Started with `--remote-debugging-port=0`: Chromium picks a free port and writes it to
DevToolsActivePort in its (fresh, temporary) profile directory. aiohttp's websocket
client speaks CDP; every console error, uncaught exception and error log entry (failed
loads, CSP violations) is collected so a test can assert there were none.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
    "--window-size=1280,1000",
)


def chromium_binary() -> str:
    """The browser, or skip (fail under CI=true: CI installs Debian's `chromium`)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if IN_CI:
        pytest.fail("chromium is not installed (CI=true: .ci/run installs it)")
    pytest.skip("chromium is not installed")


class Browser:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._profile = Path(tempfile.mkdtemp(prefix="carbon-proxy-chromium-"))
        self._process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout_seconds: float = 60.0) -> None:
        self._process = await asyncio.create_subprocess_exec(
            chromium_binary(), *FLAGS, f"--user-data-dir={self._profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        active = self._profile / "DevToolsActivePort"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while not (active.exists() and active.read_text().strip()):
            if self._process.returncode is not None or loop.time() > deadline:
                raise RuntimeError(f"chromium did not open its DevTools port (exit {self._process.returncode})")
            await asyncio.sleep(0.1)
        port = int(active.read_text().splitlines()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json(content_type=None)
        (page,) = [t for t in targets if t["type"] == "page"][:1]
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Runtime", "Log", "Page"):
            await self.send(f"{domain}.enable")

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = message.json()
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._event(data["method"], data.get("params", {}))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(RuntimeError("the DevTools connection closed"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(f"uncaught: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())

    async def send(self, method: str, timeout_seconds: float = 30.0, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        message_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = future
        await self._ws.send_json({"id": message_id, "method": method, "params": params})
        reply = await asyncio.wait_for(future, timeout_seconds)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_seconds: float) -> Any:
        """Poll `expression` until it is truthy; its last value on timeout (falsy)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while True:
            value = await self.evaluate(expression)
            if value or loop.time() > deadline:
                return value
            await asyncio.sleep(0.2)

    async def navigate(self, url: str, timeout_seconds: float = 30.0) -> None:
        await self.send("Page.navigate", url=url)
        loaded = await self.wait_for(f"location.href === {url!r} && document.readyState === 'complete'", timeout_seconds)
        if not loaded:
            raise RuntimeError(f"{url} did not load within {timeout_seconds} s")

    async def screenshot(self, path: Path) -> None:
        result = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(result["data"]))

    async def viewport(self, width: int, height: int, mobile: bool) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=2 if mobile else 1, mobile=mobile
        )

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except asyncio.TimeoutError:
                self._process.kill()
                await self._process.wait()
        shutil.rmtree(self._profile, ignore_errors=True)
