"""[receipts] backend, dsn, dsn_env: where receipts go besides the local SQLite file."""

from __future__ import annotations

import os
from typing import Any, Mapping

from proxy.errors import ConfigError

BACKENDS = ("sqlite", "postgres")


def parse_backend(table: Mapping[str, Any], path: str) -> tuple[str, str | None]:
    """(backend, dsn), validated; errors name the key. The DSN itself is never echoed
    (it may hold a password)."""
    backend = table.get("backend", "sqlite")
    if backend not in BACKENDS:
        raise ConfigError("receipts.backend", f"expected one of: {', '.join(BACKENDS)}; got {backend!r}")
    dsn, dsn_env = table.get("dsn"), table.get("dsn_env")
    if backend == "sqlite":
        for key, value in (("dsn", dsn), ("dsn_env", dsn_env)):
            if value is not None:
                raise ConfigError(f"receipts.{key}", 'only used with backend = "postgres"')
        return backend, None
    if path == ":memory:":
        raise ConfigError("receipts.path", "the postgres backend ships from a local SQLite file (the outbox): name a file")
    if (dsn is None) == (dsn_env is None):
        raise ConfigError("receipts.dsn", "give exactly one of dsn or dsn_env with backend = \"postgres\"")
    if dsn_env is not None:
        if not isinstance(dsn_env, str) or not dsn_env:
            raise ConfigError("receipts.dsn_env", f"expected the name of an environment variable, got {dsn_env!r}")
        dsn = os.environ.get(dsn_env)
        if not dsn:
            raise ConfigError("receipts.dsn_env", f"the environment variable {dsn_env} is not set")
    if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
        key = "receipts.dsn_env" if dsn_env is not None else "receipts.dsn"
        raise ConfigError(key, "expected a postgresql:// (or postgres://) URL")
    return backend, dsn
