"""A cap on open client connections, shared by whatever HTTP server carries the public
listener. One socket per client is the proxy's scarcest resource: past the process's
open-file limit every accept, upstream connect and receipt write fails. So the cap is
enforced at accept time: idle keep-alive connections are closed first (a client reopens
one cheaply), and only when none is idle does a new connection get a 503 and close.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Iterator, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger("carbon_proxy.server")

LOG_EVERY_SECONDS = 10.0
"""The cap's log line repeats at most this often (a flood must not flood the log)."""

CLOSE_REASONS = ("refused", "evicted_idle", "header_timeout", "keepalive_timeout")

REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s"
)
REFUSAL_BODY = b'{"error":{"message":"the proxy has too many open connections; retry shortly","type":"too_many_connections","code":503}}'


class ClientConnection(Protocol):
    def is_idle(self) -> bool:
        """Between requests, with no byte of the next one received."""
        ...

    def close_idle(self) -> None: ...


def default_max_connections() -> int:
    """Half the open-file limit: each client connection may hold an upstream one too."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 10_000
    return max(16, soft // 2)


class ConnectionGuard:
    def __init__(self, max_connections: int = 0) -> None:
        self.max_connections = max_connections or default_max_connections()
        self._open: dict[ClientConnection, None] = {}  # insertion order: oldest first
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self._logged_at = 0.0
        self._refused_since_log = 0
        self._evicted_since_log = 0

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, connection: ClientConnection) -> bool:
        """Called when a client connects: False means refuse it (answer `refusal()`)."""
        if len(self._open) >= self.max_connections and not self._evict_idle():
            self.closed["refused"] += 1
            self._refused_since_log += 1
            self._log_pressure()
            return False
        self._open[connection] = None
        return True

    def release(self, connection: ClientConnection) -> None:
        self._open.pop(connection, None)

    def count(self, reason: str) -> None:
        self.closed[reason] += 1

    def _evict_idle(self) -> bool:
        # Only under pressure, so a scan is fine; the oldest idle connection goes first.
        for connection in self._open:
            if connection.is_idle():
                del self._open[connection]
                connection.close_idle()
                self.closed["evicted_idle"] += 1
                self._evicted_since_log += 1
                self._log_pressure()
                return True
        return False

    def _log_pressure(self) -> None:
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY_SECONDS:
            return
        self._logged_at = now
        log.warning(
            "connection cap reached ([server].max_connections = %d): closed %d idle keep-alive and refused %d new "
            "connections since the last report",
            self.max_connections,
            self._evicted_since_log,
            self._refused_since_log,
        )
        self._evicted_since_log = self._refused_since_log = 0

    @staticmethod
    def refusal() -> bytes:
        return REFUSAL % (len(REFUSAL_BODY), REFUSAL_BODY)


class ConnectionsCollector(Collector):
    """carbon_proxy_client_open_connections, ..._max_connections and carbon_proxy_client_connections_closed_total by reason."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("carbon_proxy_client_open_connections", "Open client connections on the public listener.")
        gauge.add_metric([], self._guard.open)
        yield gauge
        limit = GaugeMetricFamily("carbon_proxy_client_max_connections", "The cap on open client connections.")
        limit.add_metric([], self._guard.max_connections)
        yield limit
        closed = CounterMetricFamily(
            "carbon_proxy_client_connections_closed",
            "Client connections the proxy closed or refused to protect itself, by reason.",
            labels=["reason"],
        )
        for reason, value in self._guard.closed.items():
            closed.add_metric([reason], value)
        yield closed
