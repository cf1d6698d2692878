"""The [telemetry] table, validated without importing OpenTelemetry (check-config and a
proxy that does not trace never load it)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from proxy.errors import ConfigError

KEYS = ("otlp_endpoint", "service_name", "headers", "timeout_seconds", "export_interval_ms")


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    otlp_endpoint: str
    """The collector's OTLP/HTTP base URL, e.g. http://127.0.0.1:4318 (spans go to /v1/traces)."""
    service_name: str = "carbon-proxy"
    headers: Mapping[str, str] = field(default_factory=dict)
    """Sent to the collector (e.g. an API key); never logged."""
    timeout_seconds: float = 10.0
    export_interval_ms: int = 1000
    """How long finished spans wait to be sent in one batch."""

    @property
    def traces_url(self) -> str:
        return self.otlp_endpoint.rstrip("/") + "/v1/traces"


def parse_telemetry(table: Mapping[str, Any]) -> TelemetrySettings | None:
    """None when tracing is off (no otlp_endpoint)."""
    for key in table:
        if key not in KEYS:
            raise ConfigError(f"telemetry.{key}", f"unknown key; expected one of: {', '.join(KEYS)}")
    endpoint = table.get("otlp_endpoint")
    if endpoint is None:
        if table:
            raise ConfigError("telemetry.otlp_endpoint", "missing; set the collector's OTLP/HTTP URL, e.g. http://127.0.0.1:4318")
        return None
    parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("telemetry.otlp_endpoint", f"expected an http(s) URL such as http://127.0.0.1:4318, got {endpoint!r}")
    if parts.path.rstrip("/").endswith("/v1/traces"):
        raise ConfigError("telemetry.otlp_endpoint", "give the base URL (http://host:4318); the proxy adds /v1/traces")
    service_name = table.get("service_name", "carbon-proxy")
    if not isinstance(service_name, str) or not service_name:
        raise ConfigError("telemetry.service_name", f"expected a non-empty string, got {service_name!r}")
    headers = table.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ConfigError("telemetry.headers", "expected a table of header name = string value")
    timeout = table.get("timeout_seconds", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 300:
        raise ConfigError("telemetry.timeout_seconds", f"expected a number of seconds in (0, 300], got {timeout!r}")
    interval = table.get("export_interval_ms", 1000)
    if isinstance(interval, bool) or not isinstance(interval, int) or not 10 <= interval <= 60_000:
        raise ConfigError("telemetry.export_interval_ms", f"expected whole milliseconds in [10, 60000], got {interval!r}")
    if importlib.util.find_spec("opentelemetry") is None or importlib.util.find_spec("opentelemetry.sdk") is None:
        raise ConfigError("telemetry.otlp_endpoint", "tracing needs the optional extra: pip install 'carbon-proxy[telemetry]'")
    return TelemetrySettings(endpoint, service_name, dict(headers), float(timeout), interval)
