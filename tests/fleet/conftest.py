from __future__ import annotations

import itertools
from typing import AsyncIterator, Iterator

import asyncpg
import pytest

from .pg import Cluster, require_postgres

_names = itertools.count()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """One cluster for the session (initdb takes seconds); each test gets its own database."""
    server = Cluster(require_postgres())
    server.init()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def dsn(cluster: Cluster) -> AsyncIterator[str]:
    name = f"fleet_{next(_names)}"
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    yield cluster.dsn(name)
