"""Learned attribution state, kept in the receipts SQLite file in a table of its own.

A restarted proxy is accurate from its first requests only if it remembers what it
learned: idle power, the cost model, the paces (engine.save_state). One row per device
group and device model (a group moved to other hardware starts afresh), JSON, written
every SAVE_EVERY_SECONDS and at shutdown. Its own connection and table, so the receipts
writer's schema and batching are untouched. Every failure is logged and swallowed: a
lost state costs accuracy for a minute, never a request.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from typing import Any, Mapping

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
