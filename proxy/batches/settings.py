"""The [batches] table: the Batch API's switches and limits, each error naming its key."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError

_KEYS = frozenset(
    ("enabled", "path", "max_file_bytes", "max_lines", "max_concurrency", "retention_days", "safety_margin_seconds", "yield_above_in_flight",
     "interactive_latency_objective_seconds", "interactive_latency_objective_ratio", "interactive_latency_window_seconds")
)


@dataclass(frozen=True, slots=True)
class BatchSettings:
    enabled: bool = True
    """Off: /v1/files and /v1/batches go to the upstream like any path (one that serves its own)."""
    path: str | None = None
    """The SQLite file; None: `batches.db` beside the receipts database."""
    max_file_bytes: int = 100 * 1024 * 1024
    max_lines: int = 50_000
    max_concurrency: int = 4
    """Batch lines in flight at once, over all batches."""
    retention_days: int = 30
    """Finished batches and their files are deleted this long after they end."""
    safety_margin_seconds: float = 3600.0
    """The plan ends this long before the deadline, so a slow run still finishes."""
    yield_above_in_flight: int = 64
    """Batch lines wait while more interactive requests than this are in flight (0: never wait)."""
    interactive_latency_objective_seconds: float | None = None
    """Batch lines pause while interactive p95 time to first byte on their upstream is
    over this (None: no absolute objective). See proxy.batches.latency_guard."""
    interactive_latency_objective_ratio: float | None = 1.05
    """...or over this multiple of its p95 with no batch line running (None: no relative one).
    5 % under the 10 % of issue 17: the guard learns of a breach only when its window ends,
    so the p95 over a longer stretch lands a few points above the objective."""
    interactive_latency_window_seconds: float = 2.0
    """How often the objective is judged (on the requests that ended in the window)."""
    dsn: str | None = None
    """The fleet's PostgreSQL (from [receipts] backend = "postgres"): batches live there, not in `path`."""

    @property
    def latency_guarded(self) -> bool:
        return self.interactive_latency_objective_seconds is not None or self.interactive_latency_objective_ratio is not None


def _whole(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or int(value) != value:
        raise ConfigError(key, f"expected a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(key, f"must be at least {minimum}, got {value!r}")
    return int(value)


def parse_batches(table: Any, receipts_path: str = "carbon-proxy.db") -> BatchSettings:
    if not isinstance(table, dict):
        raise ConfigError("batches", f"expected a table, got {table!r}")
    for name in table:
        if name not in _KEYS:
            raise ConfigError(f"batches.{name}", f"unknown key; expected one of: {', '.join(sorted(_KEYS))}")
    defaults = BatchSettings()
    enabled = table.get("enabled", defaults.enabled)
    if not isinstance(enabled, bool):
        raise ConfigError("batches.enabled", f"expected true or false, got {enabled!r}")
    path = table.get("path")
    if path is not None and (not isinstance(path, str) or not path):
        raise ConfigError("batches.path", f"expected a file path, got {path!r}")
    if path is None:
        path = ":memory:" if receipts_path == ":memory:" else str(Path(receipts_path).with_name("batches.db"))
    margin = table.get("safety_margin_seconds", defaults.safety_margin_seconds)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ConfigError("batches.safety_margin_seconds", f"expected a number of seconds >= 0, got {margin!r}")
    objective = table.get("interactive_latency_objective_seconds")
    if objective is not None and not _positive(objective):
        raise ConfigError("batches.interactive_latency_objective_seconds", f"expected a number of seconds > 0, got {objective!r}")
    ratio = table.get("interactive_latency_objective_ratio", defaults.interactive_latency_objective_ratio)
    if ratio == 0 and not isinstance(ratio, bool):
        ratio = None  # 0 turns the relative objective off
    elif not _positive(ratio) or ratio <= 1:
        raise ConfigError(
            "batches.interactive_latency_objective_ratio", f"expected a number > 1 (1.1: 10 % over latency alone) or 0 (off), got {ratio!r}"
        )
    window = table.get("interactive_latency_window_seconds", defaults.interactive_latency_window_seconds)
    if not _positive(window):
        raise ConfigError("batches.interactive_latency_window_seconds", f"expected a number of seconds > 0, got {window!r}")
    return BatchSettings(
        enabled=enabled,
        path=path,
        max_file_bytes=_whole("batches.max_file_bytes", table.get("max_file_bytes", defaults.max_file_bytes), 1),
        max_lines=_whole("batches.max_lines", table.get("max_lines", defaults.max_lines), 1),
        max_concurrency=_whole("batches.max_concurrency", table.get("max_concurrency", defaults.max_concurrency), 1),
        retention_days=_whole("batches.retention_days", table.get("retention_days", defaults.retention_days), 1),
        safety_margin_seconds=float(margin),
        yield_above_in_flight=_whole("batches.yield_above_in_flight", table.get("yield_above_in_flight", defaults.yield_above_in_flight), 0),
        interactive_latency_objective_seconds=None if objective is None else float(objective),
        interactive_latency_objective_ratio=None if ratio is None else float(ratio),
        interactive_latency_window_seconds=float(window),
    )


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def with_fleet(settings: BatchSettings, receipts: Any) -> BatchSettings:
    """Batches go to the fleet's PostgreSQL when the receipts do (`receipts`: ReceiptsConfig)."""
    if getattr(receipts, "backend", "sqlite") != "postgres":
        return settings
    from dataclasses import replace

    from proxy.batches.pg_store import MAX_FILE_BYTES
    from proxy.receipts.backend import resolve_dsn

    if settings.max_file_bytes > MAX_FILE_BYTES:
        message = f"at most {MAX_FILE_BYTES} with the fleet backend (a file is one PostgreSQL value), got {settings.max_file_bytes}"
        raise ConfigError("batches.max_file_bytes", message)
    return replace(settings, dsn=resolve_dsn(receipts.dsn, receipts.dsn_env))


def open_store(settings: BatchSettings) -> Any:
    """The store the settings name (a BatchStoreLike, not started): PostgreSQL or SQLite."""
    if settings.dsn is not None:
        from proxy.batches.pg_store import PgBatchStore

        return PgBatchStore(settings.dsn)
    from proxy.batches.store import BatchStore

    return BatchStore(settings.path or ":memory:")
