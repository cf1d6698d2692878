"""OpenTelemetry traces of proxied requests (issue 18), off unless `[telemetry]
otlp_endpoint` is set. This package's __init__ and `settings` import nothing of
OpenTelemetry; `proxy.telemetry.tracer` does, and is imported only when configured."""

from proxy.telemetry.settings import TelemetrySettings, parse_telemetry

__all__ = ["TelemetrySettings", "parse_telemetry"]
