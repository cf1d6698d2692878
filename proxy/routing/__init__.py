"""Choosing an upstream: by path or model to a pool, then by policy within the pool.

DESIGN.md sections 2 and 12. `Router.route()` is the one call the data path makes.
Modules: table (path/model -> pool), settings ([routing]), place (each upstream's zone,
intensity, PUE, embodied), cost (the CostModel interface and its learned default),
state (in-flight, passive health, recent TTFT, shares), guards, the policies (first,
round_robin, least_in_flight, carbon), header (X-Carbon-Route), router, sim (a fleet
in virtual time for tests and bench/routing.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Router", "RouteDecision", "RouteRefused"]

if TYPE_CHECKING:
    from proxy.routing.router import RouteDecision, RouteRefused, Router


def __getattr__(name: str) -> Any:
    # Lazy: proxy.config imports proxy.routing.settings, and the router imports config types.
    if name in __all__:
        from proxy.routing import router

        return getattr(router, name)
    raise AttributeError(name)
