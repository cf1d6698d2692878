"""Background tasks: the one way to stop them."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task[object]) -> None:
    """Cancel a background task and wait until it has really stopped (its cleanup ran)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
