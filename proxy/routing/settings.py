"""`[routing]` and `[tenants] regions`, validated into plain dataclasses (DESIGN.md section 12).

```toml
[routing]
policy = "carbon"              # first (default) | round_robin | least_in_flight | carbon
baseline = "round_robin"       # what avoided grams are measured against
healthy_only = true            # skip upstreams with recent connect failures / 5xx
unhealthy_after_failures = 3
unhealthy_seconds = 10.0       # then one request probes it again
max_ttft_p95_seconds = 5.0     # latency objective on the recent window; 0: off
max_in_flight = 0              # per upstream; 0: off
max_queued_tokens = 0          # prompt tokens sent and not yet answered, per upstream; 0: off
latency_window_seconds = 60.0
max_share = 0.0                # of a pool's recent requests per upstream; 0: off
share_window = 200
explore_share = 0.02           # requests sent to a random eligible upstream
default_output_tokens = 256    # expected output when neither max_tokens nor history says

[tenants.regions]
team-eu = ["SE", "DE"]         # zones this tenant's requests may run in
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from proxy.errors import ConfigError

POLICIES = ("first", "round_robin", "least_in_flight", "carbon")


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    policy: str = "first"
    baseline: str = "round_robin"
    healthy_only: bool = True
    unhealthy_after_failures: int = 3
    unhealthy_seconds: float = 10.0
    max_ttft_p95_seconds: float = 0.0
    max_in_flight: int = 0
    max_queued_tokens: int = 0
    """Prompt tokens (estimated) sent to one upstream and not yet answered; 0: off."""
    latency_window_seconds: float = 60.0
    max_share: float = 0.0
    share_window: int = 200
    explore_share: float = 0.0
    default_output_tokens: int = 256
    seed: int = 0
    """Seeds the exploration draw, so a run is reproducible."""
    regions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Tenant -> zones its requests may run in ([tenants.regions]); absent: anywhere."""


def _number(key: str, value: Any, *, minimum: float = 0.0, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(key, f"expected a number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum:g}" if maximum is not None else ""
        raise ConfigError(key, f"must be at least {minimum:g}{upper}, got {value!r}")
    return float(value)


def _policy(key: str, value: Any) -> str:
    if value not in POLICIES:
        raise ConfigError(key, f"unknown policy {value!r}; expected one of: {', '.join(POLICIES)}")
    return str(value)


def parse_regions(tenants: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    raw = tenants.get("regions", {})
    if not isinstance(raw, dict):
        raise ConfigError("tenants.regions", "expected a table of tenant = [\"ZONE\", ...]")
    regions: dict[str, tuple[str, ...]] = {}
    for tenant, zones in raw.items():
        if isinstance(zones, str):
            zones = [zones]
        if not isinstance(zones, list) or not zones or not all(isinstance(z, str) and z for z in zones):
            raise ConfigError(f"tenants.regions.{tenant}", f"expected a non-empty list of zones, got {zones!r}")
        regions[str(tenant)] = tuple(z.upper() for z in zones)
    return regions


def parse_routing(table: Mapping[str, Any], tenants: Mapping[str, Any] | None = None) -> RoutingSettings:
    defaults = RoutingSettings()
    allowed = {f for f in RoutingSettings.__dataclass_fields__ if f != "regions"}
    for name in table:
        if name not in allowed:
            raise ConfigError(f"routing.{name}", f"unknown key; expected one of: {', '.join(sorted(allowed))}")
    healthy_only = table.get("healthy_only", defaults.healthy_only)
    if not isinstance(healthy_only, bool):
        raise ConfigError("routing.healthy_only", f"expected true or false, got {healthy_only!r}")
    return RoutingSettings(
        policy=_policy("routing.policy", table.get("policy", defaults.policy)),
        baseline=_policy("routing.baseline", table.get("baseline", defaults.baseline)),
        healthy_only=healthy_only,
        unhealthy_after_failures=int(_number("routing.unhealthy_after_failures", table.get("unhealthy_after_failures", defaults.unhealthy_after_failures), minimum=1)),
        unhealthy_seconds=_number("routing.unhealthy_seconds", table.get("unhealthy_seconds", defaults.unhealthy_seconds)),
        max_ttft_p95_seconds=_number("routing.max_ttft_p95_seconds", table.get("max_ttft_p95_seconds", defaults.max_ttft_p95_seconds)),
        max_in_flight=int(_number("routing.max_in_flight", table.get("max_in_flight", defaults.max_in_flight))),
        max_queued_tokens=int(_number("routing.max_queued_tokens", table.get("max_queued_tokens", defaults.max_queued_tokens))),
        latency_window_seconds=_number("routing.latency_window_seconds", table.get("latency_window_seconds", defaults.latency_window_seconds), minimum=1.0),
        max_share=_number("routing.max_share", table.get("max_share", defaults.max_share), maximum=1.0),
        share_window=int(_number("routing.share_window", table.get("share_window", defaults.share_window), minimum=1)),
        explore_share=_number("routing.explore_share", table.get("explore_share", defaults.explore_share), maximum=0.5),
        default_output_tokens=int(_number("routing.default_output_tokens", table.get("default_output_tokens", defaults.default_output_tokens), minimum=1)),
        seed=int(_number("routing.seed", table.get("seed", defaults.seed))),
        regions=parse_regions(tenants or {}),
    )


PLACE_KEYS = ("zone", "intensity", "carbon", "embodied_g_per_second")


def parse_place(key: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """An upstream's place keys, checked for shape; the intensity source itself is built
    (and its provider settings validated) by proxy.routing.place."""
    place: dict[str, Any] = {}
    zone = table.get("zone")
    if zone is not None:
        if not isinstance(zone, str) or not zone.strip():
            raise ConfigError(f"{key}.zone", f"expected a zone such as \"SE\" or \"gcp:europe-north1\", got {zone!r}")
        place["zone"] = zone.strip()
    if "intensity" in table and "carbon" in table:
        raise ConfigError(f"{key}.intensity", "intensity = N and [upstreams.carbon] exclude each other; keep one")
    if "intensity" in table:
        value = table["intensity"]
        if isinstance(value, str):
            place["intensity"] = value
        else:
            place["intensity"] = _number(f"{key}.intensity", value)
    if "carbon" in table:
        carbon = table["carbon"]
        if not isinstance(carbon, dict):
            raise ConfigError(f"{key}.carbon", f"expected a table like [carbon], got {carbon!r}")
        place["carbon"] = dict(carbon)
    if "embodied_g_per_second" in table:
        place["embodied_g_per_second"] = _number(f"{key}.embodied_g_per_second", table["embodied_g_per_second"])
    return place
