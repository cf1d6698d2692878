"""`carbon-proxy demo --traffic` as a real process (sim + proxy + traffic), for the
browser test: the URLs come from its banner, as a user reads them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import AsyncIterator

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CARBON_PROXY_TEST_ARTIFACTS", REPO / "test-artifacts"))
_URL = re.compile(r"^\s+(proxy|live|metrics|sim)\s+(http://\S+)")


@contextlib.asynccontextmanager
async def running_demo(timeout_seconds: float = 60.0) -> AsyncIterator[dict[str, str]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", "--port", "0", "--admin-port", "0", "--sim-port", "0", "--traffic",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    urls: dict[str, str] = {}
    lines: list[str] = []
    try:
        async with asyncio.timeout(timeout_seconds):
            while not {"proxy", "live"} <= urls.keys():
                raw = await process.stdout.readline()
                if not raw:
                    raise AssertionError("the demo exited before printing its URLs:\n" + "".join(lines))
                line = raw.decode(errors="replace")
                lines.append(line)
                match = _URL.match(line)
                if match:
                    urls[match.group(1)] = match.group(2)
        # Keep reading its table so a full pipe never blocks it.
        drain = asyncio.create_task(_drain(process.stdout))
        yield urls
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        with contextlib.suppress(NameError):
            drain.cancel()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
