"""[receipts] backend/dsn/dsn_env: bad values name the key; the DSN comes from the
environment only when the store is built (check-config needs no secret)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.build import build_receipts
from proxy.config import config_from_dict
from proxy.errors import ConfigError
from proxy.receipts.fleet import FleetReceiptStore


def config(**receipts: Any) -> dict[str, Any]:
    return {"upstreams": [{"name": "u", "url": "http://127.0.0.1:9"}], "receipts": {"path": "/tmp/x.db", **receipts}}


@pytest.mark.parametrize(
    ("receipts", "key"),
    [
        ({"backend": "mysql"}, "receipts.backend"),
        ({"backend": "postgres"}, "receipts.dsn"),
        ({"backend": "postgres", "dsn": "postgresql://a", "dsn_env": "X"}, "receipts.dsn"),
        ({"backend": "postgres", "dsn": "mysql://a"}, "receipts.dsn"),
        ({"backend": "postgres", "dsn_env": ""}, "receipts.dsn_env"),
        ({"dsn": "postgresql://a"}, "receipts.dsn"),
        ({"backend": "postgres", "dsn": "postgresql://a", "path": ":memory:"}, "receipts.path"),
    ],
)
def test_bad_backend_settings_name_the_key(receipts: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict(config(**receipts))
    assert error.value.key == key
    assert "postgresql://a" not in str(error.value)  # a DSN may hold a password: never echoed


def test_dsn_env_is_read_when_the_store_is_built(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    parsed = config_from_dict(config(backend="postgres", dsn_env="CARBON_TEST_DSN", path=str(tmp_path / "r.db")))
    monkeypatch.delenv("CARBON_TEST_DSN", raising=False)
    with pytest.raises(ConfigError) as error:
        build_receipts(parsed)
    assert error.value.key == "receipts.dsn_env" and "CARBON_TEST_DSN" in error.value.reason
    monkeypatch.setenv("CARBON_TEST_DSN", "postgresql://carbon@127.0.0.1:1/x")
    assert isinstance(build_receipts(parsed), FleetReceiptStore)
