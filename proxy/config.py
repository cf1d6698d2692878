"""The configuration: TOML file or `serve` flags, validated into plain dataclasses.

Every error names the dotted key and the reason (ConfigError), so `check-config`
and `serve` can exit 2 with a message the user can act on.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.carbon.pue import resolve_pue
from proxy.errors import ConfigError
from proxy.receipts.backend import parse_backend
from proxy.routing.settings import PLACE_KEYS, RoutingSettings, parse_place, parse_routing

DIALECTS = ("openai", "tgi", "ollama", "llamacpp", "diffusion", "generic")
METERS = ("auto", "nvml", "scrape", "rapl", "estimate", "sim")


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_seconds: float = 5.0
    first_byte_seconds: float = 300.0
    """Upstream may think for a long time before the first byte (long prompts, queues)."""
    idle_seconds: float = 120.0
    """Longest silence allowed between two chunks of a response."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: HostPort = HostPort("127.0.0.1", 8080)
    admin_listen: HostPort = HostPort("127.0.0.1", 9464)
    max_body_bytes: int = 64 * 1024 * 1024
    """Largest request body accepted; more gets 413."""
    max_buffer_bytes: int = 16 * 1024 * 1024
    """Non-streaming responses up to this size are held until complete so that the
    emissions headers can be sent with them; larger ones stream and get a receipt only."""
    drain_seconds: float = 30.0
    max_event_bytes: int = 1024 * 1024
    """Largest SSE event / NDJSON line of a stream held for reading; a longer one (an
    upstream that never ends its line) passes through unread, figures flagged."""
    trust_forwarded: bool = False
    """Keep an incoming X-Forwarded-For chain (when behind a trusted load balancer)."""
    client_write_seconds: float = 30.0
    """A write blocked on a client that reads nothing for this long cuts that client
    (and its upstream call): a stuck reader must not hold a model server's stream."""
    keepalive_seconds: float = 75.0
    """An idle keep-alive connection (between requests) is closed after this long."""
    header_read_seconds: float = 10.0
    """A request head must arrive complete within this long of its first byte (slowloris)."""
    max_connections: int = 0
    """Open client connections at most; beyond it idle keep-alives are closed first, then
    new connections get 503. 0 = half of the process's open-file limit (each client
    connection may hold an upstream connection too)."""


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str
    dialect: str = "openai"
    routes: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    """Meter device ids this server runs on; empty means all devices of the meter."""
    pue: float | None = None
    device_model: str | None = None
    """For embodied carbon and the attribution prior; None: `[carbon] device_model`, else
    the model the meter names for these devices, else H100 (proxy.carbon.embodied)."""
    timeouts: Timeouts = Timeouts()
    place: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Where it runs: `zone`, `intensity`, `[upstreams.carbon]` (proxy.routing.place reads them)."""


@dataclass(frozen=True, slots=True)
class MeterConfig:
    kind: str = "auto"
    interval_ms: int = 20
    """How often the meter is read. A counter change is placed between the two reads around
    it, so a read every 20 ms places an NVML refresh (every 20-100 ms) within 10 ms. Read
    slower than the counter refreshes, every read sees a change and can only be stamped
    at its own time, up to a refresh late: at 50 ms the end-of-response figure was 6-8%
    off (p90 17-23%) on counters refreshing every 32-36 ms, 2-4% (p90 8-14%) at 20 ms.
    A read the counter has not changed since costs the engine nothing."""
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Every [meter.KIND] sub-table given, so `--meter KIND` finds its settings."""

    @property
    def options(self) -> dict[str, Any]:
        """The sub-table of the chosen kind, e.g. [meter.scrape]."""
        return dict(self.tables.get(self.kind, {}))


@dataclass(frozen=True, slots=True)
class AttributionConfig:
    prefill_weight: float | None = None
    """None means 'auto': learned online, starting from DEFAULT_PREFILL_WEIGHT."""
    idle_power_watts: float | dict[str, float] | None = None
    """None means 'auto': learned as a low percentile of power while nothing is in flight."""
    settle_ms: float = 0.0
    """Hold the last bytes of a response at most this long for the next meter reading,
    so that its figure covers its end (0: send at once, with a predicted tail)."""


@dataclass(frozen=True, slots=True)
class ReceiptsConfig:
    path: str = "carbon-proxy.db"
    retention_days: int = 90
    max_mb: float | None = 1024.0
    """Size cap of the database file: the oldest receipts go first. None: retention only."""
    commit_wait_ms: float = 100.0
    """How long a response may wait for its receipt's batch to commit before its last
    bytes go out (group commit: a completed response has a durable receipt). 0: never."""
    backend: str = "sqlite"
    """sqlite, or postgres: the SQLite file is then the outbox shipped to `dsn` (DESIGN 11)."""
    dsn: str | None = None
    """The PostgreSQL DSN, when given in the file."""
    dsn_env: str | None = None
    """Else the environment variable holding it (read when the store is built)."""


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    upstreams: tuple[UpstreamConfig, ...] = ()
    meter: MeterConfig = MeterConfig()
    carbon: dict[str, Any] = field(default_factory=lambda: {"intensity": 475.0})
    """The [carbon] table, validated by proxy.carbon when the provider is built."""
    pue: float = 1.58
    """Default PUE for upstreams that name none ([carbon].pue; see proxy.carbon.pue)."""
    attribution: AttributionConfig = AttributionConfig()
    receipts: ReceiptsConfig = ReceiptsConfig()
    tenants: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)
    """The [telemetry] table (OpenTelemetry export), validated by proxy.telemetry.settings."""
    routing: RoutingSettings = RoutingSettings()
    batches: dict[str, Any] = field(default_factory=dict)
    """The [batches] table (the Batch API), validated by proxy.batches.settings."""


# -- parsing helpers: each takes the dotted key so errors can name it ----------------


def parse_host_port(key: str, value: Any) -> HostPort:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(key, f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} is out of range 0-65535")
    return HostPort(host, port)


def _number(key: str, value: Any, *, minimum: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):  # TOML has inf and nan; int(inf) would raise later
        raise ConfigError(key, f"expected a finite number, got {value!r}")
    if positive and number <= 0:
        raise ConfigError(key, f"must be greater than 0, got {value!r}")
    if minimum is not None and number < minimum:
        raise ConfigError(key, f"must be at least {minimum:g}, got {value!r}")
    return number


def _whole(key: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(key, f"must be at least {minimum}, got {value!r}")
    return value


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):  # bool("false") is True: a quoted false must not switch it on
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _string_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
        raise ConfigError(key, f"expected a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def _table(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a table, got {value!r}")
    return value


def _check_keys(key: str, table: dict[str, Any], allowed: set[str]) -> None:
    for name in table:
        if name not in allowed:
            where = f"{key}.{name}" if key else name
            raise ConfigError(where, f"unknown key; expected one of: {', '.join(sorted(allowed))}")


def parse_upstream_url(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a URL string, got {value!r}")
    try:
        parts = urlsplit(value)
        parts.port  # raises for a port out of range or not a number
    except ValueError as exc:
        raise ConfigError(key, f"not a valid URL ({exc}): {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"expected an http:// or https:// URL with a host, got {value!r}")
    return value.rstrip("/")


def _timeouts(key: str, table: dict[str, Any]) -> Timeouts:
    _check_keys(key, table, {"connect_seconds", "first_byte_seconds", "idle_seconds"})
    values = {name: _number(f"{key}.{name}", v, positive=True) for name, v in table.items()}
    return Timeouts(**values)


def _upstream(key: str, table: dict[str, Any], default_timeouts: Timeouts) -> UpstreamConfig:
    allowed = {"name", "url", "dialect", "routes", "models", "devices", "pue", "device_model", "timeouts", *PLACE_KEYS}
    _check_keys(key, table, allowed)
    if "url" not in table:
        raise ConfigError(f"{key}.url", "missing; every upstream needs the URL of its model server")
    url = parse_upstream_url(f"{key}.url", table["url"])
    name = table.get("name", urlsplit(url).netloc)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key}.name", f"expected a non-empty string, got {name!r}")
    dialect = table.get("dialect", "openai")
    if dialect not in DIALECTS:
        raise ConfigError(f"{key}.dialect", f"unknown dialect {dialect!r}; expected one of: {', '.join(DIALECTS)}")
    routes = _string_list(f"{key}.routes", table.get("routes", []))
    for route in routes:
        if not route.startswith("/"):
            raise ConfigError(f"{key}.routes", f"route {route!r} must be a path prefix starting with '/'")
    pue = table.get("pue")
    timeouts = default_timeouts
    if "timeouts" in table:
        merged = {**_timeouts_as_dict(default_timeouts), **_table(f"{key}.timeouts", table["timeouts"])}
        timeouts = _timeouts(f"{key}.timeouts", merged)
    device_model = table.get("device_model")
    if device_model is not None and not isinstance(device_model, str):
        raise ConfigError(f"{key}.device_model", f"expected a string such as 'H100', got {device_model!r}")
    return UpstreamConfig(
        name=name,
        url=url,
        dialect=dialect,
        routes=routes,
        models=_string_list(f"{key}.models", table.get("models", [])),
        devices=_string_list(f"{key}.devices", table.get("devices", [])),
        pue=None if pue is None else resolve_pue(pue, key=f"{key}.pue")[0],
        device_model=device_model,
        timeouts=timeouts,
        place=parse_place(key, table),
    )


def _timeouts_as_dict(timeouts: Timeouts) -> dict[str, float]:
    return {
        "connect_seconds": timeouts.connect_seconds,
        "first_byte_seconds": timeouts.first_byte_seconds,
        "idle_seconds": timeouts.idle_seconds,
    }


def _server(table: dict[str, Any]) -> tuple[ServerConfig, Timeouts]:
    allowed = {
        "listen",
        "admin_listen",
        "max_body_bytes",
        "max_buffer_bytes",
        "max_event_bytes",
        "drain_seconds",
        "trust_forwarded",
        "timeouts",
        "client_write_seconds",
        "keepalive_seconds",
        "header_read_seconds",
        "max_connections",
    }
    _check_keys("server", table, allowed)
    defaults = ServerConfig()
    server = ServerConfig(
        listen=parse_host_port("server.listen", table["listen"]) if "listen" in table else defaults.listen,
        admin_listen=(
            parse_host_port("server.admin_listen", table["admin_listen"]) if "admin_listen" in table else defaults.admin_listen
        ),
        max_body_bytes=int(_number("server.max_body_bytes", table.get("max_body_bytes", defaults.max_body_bytes), positive=True)),
        max_buffer_bytes=int(
            _number("server.max_buffer_bytes", table.get("max_buffer_bytes", defaults.max_buffer_bytes), positive=True)
        ),
        drain_seconds=_number("server.drain_seconds", table.get("drain_seconds", defaults.drain_seconds), minimum=0),
        # Below a few KiB, ordinary events (a usage chunk, a long token) would overflow it.
        max_event_bytes=int(_number("server.max_event_bytes", table.get("max_event_bytes", defaults.max_event_bytes), minimum=4096)),
        trust_forwarded=_boolean("server.trust_forwarded", table.get("trust_forwarded", False)),
        client_write_seconds=_number(
            "server.client_write_seconds", table.get("client_write_seconds", defaults.client_write_seconds), positive=True
        ),
        keepalive_seconds=_number("server.keepalive_seconds", table.get("keepalive_seconds", defaults.keepalive_seconds), positive=True),
        header_read_seconds=_number(
            "server.header_read_seconds", table.get("header_read_seconds", defaults.header_read_seconds), positive=True
        ),
        max_connections=_whole("server.max_connections", table.get("max_connections", defaults.max_connections), minimum=0),
    )
    timeouts = _timeouts("server.timeouts", _table("server.timeouts", table.get("timeouts", {})))
    return server, timeouts


def _meter(table: dict[str, Any]) -> MeterConfig:
    kind = table.get("kind", "auto")
    if kind not in METERS:
        raise ConfigError("meter.kind", f"unknown meter {kind!r}; expected one of: {', '.join(METERS)}")
    allowed = {"kind", "interval_ms", *METERS}
    _check_keys("meter", table, allowed)
    interval_ms = _number("meter.interval_ms", table.get("interval_ms", MeterConfig().interval_ms), minimum=10)
    tables = {name: dict(_table(f"meter.{name}", table[name])) for name in METERS if name in table}
    return MeterConfig(kind=kind, interval_ms=int(interval_ms), tables=tables)


def _attribution(table: dict[str, Any]) -> AttributionConfig:
    _check_keys("attribution", table, {"prefill_weight", "idle_power_watts", "settle_ms"})
    weight = table.get("prefill_weight", "auto")
    prefill_weight = None if weight == "auto" else _number("attribution.prefill_weight", weight, minimum=0)
    idle = table.get("idle_power_watts", "auto")
    idle_power: float | dict[str, float] | None
    if idle == "auto":
        idle_power = None
    elif isinstance(idle, dict):
        idle_power = {str(k): _number(f"attribution.idle_power_watts.{k}", v, minimum=0) for k, v in idle.items()}
    else:
        idle_power = _number("attribution.idle_power_watts", idle, minimum=0)
    settle_ms = _number("attribution.settle_ms", table.get("settle_ms", 0), minimum=0)
    if settle_ms > 10_000:
        raise ConfigError("attribution.settle_ms", f"at most 10000 (a response's last bytes wait that long), got {settle_ms!r}")
    return AttributionConfig(prefill_weight=prefill_weight, idle_power_watts=idle_power, settle_ms=float(settle_ms))


def _receipts(table: dict[str, Any]) -> ReceiptsConfig:
    _check_keys("receipts", table, {"path", "retention_days", "max_mb", "commit_wait_ms", "backend", "dsn", "dsn_env"})
    path = table.get("path", "carbon-proxy.db")
    if not isinstance(path, str) or not path:
        raise ConfigError("receipts.path", f"expected a file path, got {path!r}")
    days = _number("receipts.retention_days", table.get("retention_days", 90), positive=True)
    defaults = ReceiptsConfig()
    max_mb = table.get("max_mb", defaults.max_mb)
    # 0 (or false) switches the cap off; retention then bounds the file alone.
    cap = None if max_mb in (0, False) else _number("receipts.max_mb", max_mb, positive=True)
    wait = _number("receipts.commit_wait_ms", table.get("commit_wait_ms", defaults.commit_wait_ms), minimum=0)
    backend, dsn, dsn_env = parse_backend(table, path)
    return ReceiptsConfig(
        path=path, retention_days=int(days), max_mb=cap, commit_wait_ms=wait, backend=backend, dsn=dsn, dsn_env=dsn_env
    )


def _check_routing(upstreams: tuple[UpstreamConfig, ...]) -> None:
    if not upstreams:
        raise ConfigError("upstreams", "at least one [[upstreams]] entry (or --upstream URL) is required")
    names: set[str] = set()
    for i, upstream in enumerate(upstreams):
        if upstream.name in names:
            raise ConfigError(f"upstreams[{i}].name", f"duplicate upstream name {upstream.name!r}")
        names.add(upstream.name)
    # Device groups must be identical or disjoint, or one joule would be counted twice.
    for i, upstream in enumerate(upstreams):
        mine = frozenset(upstream.devices)
        for earlier in upstreams[:i]:
            other = frozenset(earlier.devices)
            if mine and other and mine != other and mine & other:
                raise ConfigError(
                    f"upstreams[{i}].devices",
                    f"devices {sorted(mine)} partly overlap {sorted(other)} of {earlier.name!r}; "
                    "upstreams on shared GPUs must list the same devices",
                )


def config_from_dict(data: dict[str, Any]) -> Config:
    _check_keys("", data, {"server", "upstreams", "meter", "carbon", "attribution", "receipts", "tenants", "telemetry", "routing", "batches"})
    server, default_timeouts = _server(_table("server", data.get("server", {})))
    raw_upstreams = data.get("upstreams", [])
    if not isinstance(raw_upstreams, list):
        raise ConfigError("upstreams", "expected an array of tables: [[upstreams]]")
    upstreams = tuple(
        _upstream(f"upstreams[{i}]", _table(f"upstreams[{i}]", u), default_timeouts) for i, u in enumerate(raw_upstreams)
    )
    _check_routing(upstreams)
    carbon = dict(_table("carbon", data.get("carbon", {"intensity": 475.0})))
    # [carbon].pue is the default for upstreams that set none; proxy.carbon never sees it.
    # Nothing set: the cloud's own PUE for a cloud-region zone, else the industry average.
    zone = carbon.get("zone")  # validated with the provider; here only a cloud-region hint
    pue, _ = resolve_pue(carbon.pop("pue", None), key="carbon.pue", zone=zone if isinstance(zone, str) else None)
    return Config(
        server=server,
        upstreams=upstreams,
        meter=_meter(_table("meter", data.get("meter", {}))),
        carbon=carbon,
        pue=pue,
        attribution=_attribution(_table("attribution", data.get("attribution", {}))),
        receipts=_receipts(_table("receipts", data.get("receipts", {}))),
        tenants=dict(_table("tenants", data.get("tenants", {}))),
        telemetry=_telemetry(_table("telemetry", data.get("telemetry", {}))),
        routing=parse_routing(_table("routing", data.get("routing", {})), _table("tenants", data.get("tenants", {}))),
        batches=_batches(data.get("batches", {})),
    )


def _batches(table: Any) -> dict[str, Any]:
    from proxy.batches.settings import parse_batches

    parse_batches(table)  # errors name the key now, for check-config and serve alike
    return dict(table)


def _telemetry(table: dict[str, Any]) -> dict[str, Any]:
    from proxy.telemetry.settings import parse_telemetry  # imports no OpenTelemetry

    parse_telemetry(table)  # errors name the key now, for check-config and serve alike
    return dict(table)


def load_config(path: str | Path) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8 text (byte {exc.start}): TOML files are UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from None
    return config_from_dict(data)
