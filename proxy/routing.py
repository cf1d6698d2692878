"""Choose the upstream for a request: by model name, else by the longest path prefix."""

from __future__ import annotations

from proxy.config import UpstreamConfig


class Router:
    def __init__(self, upstreams: tuple[UpstreamConfig, ...]) -> None:
        self._by_model = {model: u for u in upstreams for model in u.models}
        # Longest prefix first, so "/v1/images/" wins over "/v1/".
        self._prefixes = sorted(((route, u) for u in upstreams for route in u.routes), key=lambda p: -len(p[0]))
        unrouted = [u for u in upstreams if not u.routes and not u.models]
        self._default = unrouted[0] if unrouted else None

    @property
    def needs_model(self) -> bool:
        """True when routing may depend on the request body's `model`."""
        return bool(self._by_model)

    def route(self, path: str, model: str | None) -> UpstreamConfig | None:
        if model is not None:
            upstream = self._by_model.get(model)
            if upstream is not None:
                return upstream
        for prefix, upstream in self._prefixes:
            if path.startswith(prefix):
                return upstream
        return self._default
