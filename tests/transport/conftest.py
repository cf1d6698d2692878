"""Every async test of the transport runs twice: on asyncio's own loop and on uvloop.

uvloop's transports are not asyncio.Transport subclasses and differ in small ways (when
connection_lost runs, what an OSError says), so the transport is checked on both loops
the proxy may run on (proxy.cli runs uvloop; the tests elsewhere run asyncio's).
"""

from __future__ import annotations

import asyncio
from typing import Callable

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    # pytest-asyncio >= 1.4 parametrizes each async test over these (ids: [asyncio], [uvloop]).
    return {"asyncio": asyncio.SelectorEventLoop, "uvloop": uvloop.new_event_loop}
