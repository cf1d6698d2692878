"""Fixtures for the carbon tests: a fake API server on 127.0.0.1 and a refused port."""

from __future__ import annotations

import socket
from typing import AsyncIterator

import pytest

from carbon_fakes import FakeApi


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeApi]:
    api = FakeApi()
    await api.start()
    try:
        yield api
    finally:
        await api.close()


@pytest.fixture
def refused_url() -> str:
    """A local port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
