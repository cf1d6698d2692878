"""Fixtures of the hostile-input suite: a proxy (SQLite receipts in tmp_path) in front of a
recording upstream. Tests that need another upstream or config use
`support.start_hostile_proxy` directly."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest

from .support import HostileProxy, start_hostile_proxy, start_recording_upstream


@pytest.fixture
async def hostile_proxy(tmp_path: Path) -> AsyncIterator[HostileProxy]:
    runner, url, recorder = await start_recording_upstream()
    proxy = await start_hostile_proxy(tmp_path, url, recorder, tenants={"header": "X-Tenant-Id"})
    try:
        yield proxy
    finally:
        await proxy.close()
        await runner.cleanup()
