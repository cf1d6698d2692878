"""[receipts] backend, dsn, dsn_env: where receipts go besides the local SQLite file."""

from __future__ import annotations

import os
from typing import Any, Mapping

from proxy.errors import ConfigError

BACKENDS = ("sqlite", "postgres")


def parse_backend(table: Mapping[str, Any], path: str) -> tuple[str, str | None, str | None]:
    """(backend, dsn, dsn_env), validated; errors name the key. The environment variable
    is read when the store is built (resolve_dsn), so check-config needs no secret. The
    DSN itself is never echoed (it may hold a password)."""
    backend = table.get("backend", "sqlite")
    if backend not in BACKENDS:
        raise ConfigError("receipts.backend", f"expected one of: {', '.join(BACKENDS)}; got {backend!r}")
    dsn, dsn_env = table.get("dsn"), table.get("dsn_env")
    if backend == "sqlite":
        for key, value in (("dsn", dsn), ("dsn_env", dsn_env)):
            if value is not None:
                raise ConfigError(f"receipts.{key}", 'only used with backend = "postgres"')
        return backend, None, None
    if path == ":memory:":
        raise ConfigError("receipts.path", "the postgres backend ships from a local SQLite file (the outbox): name a file")
    if (dsn is None) == (dsn_env is None):
        raise ConfigError("receipts.dsn", "give exactly one of dsn or dsn_env with backend = \"postgres\"")
    if dsn_env is not None:
        if not isinstance(dsn_env, str) or not dsn_env:
            raise ConfigError("receipts.dsn_env", f"expected the name of an environment variable, got {dsn_env!r}")
        return backend, None, dsn_env
    _check_url("receipts.dsn", dsn)
    return backend, dsn, None


def resolve_dsn(dsn: str | None, dsn_env: str | None) -> str:
    """The DSN to connect to: `dsn`, or the value of the variable `dsn_env` names."""
    if dsn is not None:
        return dsn
    value = os.environ.get(dsn_env or "")
    if not value:
        raise ConfigError("receipts.dsn_env", f"the environment variable {dsn_env} is not set")
    _check_url("receipts.dsn_env", value)
    return value


def _check_url(key: str, dsn: object) -> None:
    if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(key, "expected a postgresql:// (or postgres://) URL")
