"""Scripted costs, intensities and clocks for router tests."""

from __future__ import annotations

from typing import Any

from proxy.carbon.intensity import IntensityReading
from proxy.config import config_from_dict
from proxy.routing.place import Site
from proxy.routing.router import Router
from proxy.routing.settings import parse_routing


class ScriptedIntensity:
    """An intensity source whose value a test sets."""

    def __init__(self, g_per_kwh: float) -> None:
        self.g_per_kwh = g_per_kwh

    async def start(self) -> None:
        return None

    def current(self) -> IntensityReading:
        return IntensityReading(self.g_per_kwh, "scripted")

    def at(self, unix_seconds: float) -> IntensityReading:
        return self.current()

    async def close(self) -> None:
        return None


class ScriptedCost:
    """Fixed joules and embodied grams per output token, per upstream."""

    def __init__(self, joules_per_token: dict[str, float], embodied_per_token: dict[str, float] | None = None) -> None:
        self.joules_per_token = joules_per_token
        self.embodied_per_token = embodied_per_token or {}
        self.observed: list[tuple[Any, ...]] = []

    def predict_joules(self, upstream: str, prompt_tokens: int, output_tokens: int) -> float:
        return self.joules_per_token[upstream] * output_tokens

    def predict_embodied_grams(self, upstream: str, prompt_tokens: int, output_tokens: int) -> float:
        return self.embodied_per_token.get(upstream, 0.0) * output_tokens

    def expected_output_tokens(self, model: str | None, max_tokens: int | None) -> int:
        return max_tokens or 100

    def observe(self, *args: Any) -> None:
        self.observed.append(args)

    def samples(self, upstream: str) -> int:
        return 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_router(
    places: dict[str, tuple[str, float]],
    joules_per_token: dict[str, float],
    *,
    routing: dict[str, Any] | None = None,
    tenants: dict[str, Any] | None = None,
    embodied: dict[str, float] | None = None,
    clock: Clock | None = None,
) -> tuple[Router, dict[str, ScriptedIntensity]]:
    """A pool of upstreams serving model "m": name -> (zone, g/kWh), PUE 1."""
    config = config_from_dict({
        "upstreams": [{"name": n, "url": f"http://{n}.invalid", "models": ["m"], "zone": z, "pue": 1.0} for n, (z, _) in places.items()],
        "routing": routing or {"policy": "carbon"},
        "tenants": tenants or {},
    })
    intensities = {n: ScriptedIntensity(g) for n, (_, g) in places.items()}
    sites = {n: Site(n, z.upper(), intensities[n], 1.0, False) for n, (z, _) in places.items()}
    router = Router(
        config.upstreams, parse_routing(routing or {"policy": "carbon"}, tenants or {}),
        sites=sites, cost=ScriptedCost(joules_per_token, embodied), clock=clock or Clock(),
    )
    return router, intensities
