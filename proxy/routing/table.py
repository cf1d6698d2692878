"""Which pool serves a request: by model name, else by the longest path prefix, else the default.

Several upstreams naming the same model (or the same route prefix) form a pool, in
config order; the policy picks one member per request (proxy.routing.router).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.config import UpstreamConfig

Pool = tuple["UpstreamConfig", ...]


class RouteTable:
    def __init__(self, upstreams: tuple["UpstreamConfig", ...]) -> None:
        by_model: dict[str, list[UpstreamConfig]] = {}
        by_prefix: dict[str, list[UpstreamConfig]] = {}
        for upstream in upstreams:
            for model in upstream.models:
                by_model.setdefault(model, []).append(upstream)
            for route in upstream.routes:
                by_prefix.setdefault(route, []).append(upstream)
        self._by_model: dict[str, Pool] = {m: tuple(p) for m, p in by_model.items()}
        # Longest prefix first, so "/v1/images/" wins over "/v1/".
        self._prefixes = sorted(((r, tuple(p)) for r, p in by_prefix.items()), key=lambda item: -len(item[0]))
        self._default: Pool = tuple(u for u in upstreams if not u.routes and not u.models)

    @property
    def needs_model(self) -> bool:
        """True when routing may depend on the request body's `model`."""
        return bool(self._by_model)

    def pools(self) -> list[Pool]:
        seen: dict[tuple[str, ...], Pool] = {}
        for pool in [*self._by_model.values(), *(p for _, p in self._prefixes), self._default]:
            if pool:
                seen[tuple(u.name for u in pool)] = pool
        return list(seen.values())

    def pool(self, path: str, model: str | None) -> Pool:
        if model is not None:
            pool = self._by_model.get(model)
            if pool:
                return pool
        for prefix, pool in self._prefixes:
            if path.startswith(prefix):
                return pool
        return self._default
