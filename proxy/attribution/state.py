"""Learned attribution state, kept in the receipts SQLite file in a table of its own.

A restarted proxy is accurate from its first requests only if it remembers what it
learned: idle power, the cost model, the paces (engine.save_state). One row per device
group and device model (a group moved to other hardware starts afresh), JSON, written
every SAVE_EVERY_SECONDS and at shutdown. Its own connection and table, so the receipts
writer's schema and batching are untouched. Every failure is logged and swallowed: a
lost state costs accuracy for a minute, never a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from typing import TYPE_CHECKING, Any, Mapping

from proxy.tasks import cancel_and_wait

if TYPE_CHECKING:
    from proxy.attribution.engine import AttributionEngine

log = logging.getLogger("carbon_proxy.attribution.state")

SAVE_EVERY_SECONDS = 60.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS attribution_state (
    group_name TEXT NOT NULL,
    device_model TEXT NOT NULL,
    state TEXT NOT NULL,
    saved_unix REAL NOT NULL,
    PRIMARY KEY (group_name, device_model)
)
"""


class LearnedStateStore:
    """Blocking calls (run them in a thread from async code); one short transaction each."""

    def __init__(self, path: str, device_models: Mapping[str, str]) -> None:
        """path: the receipts database file; device_models: group name -> device model."""
        self._path = path
        self._device_models = dict(device_models)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self._path, timeout=5.0)
        connection.execute("PRAGMA busy_timeout = 5000")
        connection.execute(_SCHEMA)
        return connection

    def load(self) -> dict[str, Any]:
        """group name -> saved state, for the groups on the same device model as now."""
        try:
            connection = self._connect()
            try:
                rows = connection.execute("SELECT group_name, device_model, state FROM attribution_state").fetchall()
            finally:
                connection.close()
        except sqlite3.Error as err:
            log.warning("could not read learned attribution state from %s: %s", self._path, err)
            return {}
        states: dict[str, Any] = {}
        for group, device_model, text in rows:
            if self._device_models.get(group) != device_model:
                continue
            try:
                states[group] = json.loads(text)
            except ValueError:
                log.warning("learned attribution state of %r is not JSON; learning it again", group)
        return states

    def save(self, states: Mapping[str, Any]) -> None:
        now = time.time()
        rows = [
            (group, self._device_models.get(group, ""), json.dumps(state, allow_nan=False), now)
            for group, state in states.items()
        ]
        try:
            connection = self._connect()
            try:
                with connection:
                    connection.executemany(
                        "INSERT INTO attribution_state (group_name, device_model, state, saved_unix) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (group_name, device_model) DO UPDATE SET state = excluded.state, saved_unix = excluded.saved_unix",
                        rows,
                    )
            finally:
                connection.close()
        except (sqlite3.Error, ValueError) as err:
            log.warning("could not save learned attribution state to %s: %s", self._path, err)


class StateKeeper:
    """Loads an engine's learned state at start, saves it every SAVE_EVERY_SECONDS and at
    stop, off the event loop (a thread: sqlite3 blocks)."""

    def __init__(self, engine: "AttributionEngine", store: LearnedStateStore, every_seconds: float = SAVE_EVERY_SECONDS) -> None:
        self._engine = engine
        self._store = store
        self._every = every_seconds
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> list[str]:
        """Restore what was saved; returns the groups restored."""
        states = await asyncio.to_thread(self._store.load)
        restored = self._engine.load_state(states) if states else []
        if restored:
            log.info("attribution resumes with learned state for %s", ", ".join(restored))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="attribution-state")
        return restored

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            await self.save()

    async def save(self) -> None:
        try:
            states = self._engine.save_state()
        except Exception:
            log.exception("could not snapshot the learned attribution state")
            return
        await asyncio.to_thread(self._store.save, states)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self.save()
