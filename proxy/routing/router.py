"""The router: path or model -> pool (proxy.routing.table), then guards and a policy.

`route()` is the data path's one call; it never awaits and never touches the network
(intensity sources are cached, cost models are in memory). `started()`/`finished()`
bracket each forwarded request (in flight), and `observe()` is a ProxyServer.on_record
listener: provisional records feed passive health and TTFT, final ones the cost model.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from proxy.carbon.intensity import ConstantIntensity, IntensityProvider
from proxy.routing.carbon import CarbonPolicy
from proxy.routing.cost import CostModel, LearnedCostModel
from proxy.routing.first import FirstPolicy
from proxy.routing.guards import apply_guards
from proxy.routing.header import RouteDecision
from proxy.routing.least_in_flight import LeastInFlightPolicy
from proxy.routing.place import Site, build_sites
from proxy.routing.policy import Candidate, Policy, Prediction
from proxy.routing.request import read_request
from proxy.routing.round_robin import RoundRobinPolicy
from proxy.routing.settings import RoutingSettings
from proxy.routing.state import ShareWindow, UpstreamState, is_failure
from proxy.routing.table import Pool, RouteTable

if TYPE_CHECKING:
    from proxy.config import UpstreamConfig
    from proxy.receipts.model import Receipt

log = logging.getLogger("carbon_proxy.routing")

__all__ = ["Router", "RouteDecision", "RouteRefused", "make_policy"]

NOT_COUNTED = frozenset({"client_disconnected", "shutdown"})
"""Outcomes that say nothing about the upstream's health."""


def make_policy(name: str) -> Policy:
    policies: dict[str, Callable[[], Policy]] = {
        "first": FirstPolicy, "round_robin": RoundRobinPolicy, "least_in_flight": LeastInFlightPolicy, "carbon": CarbonPolicy,
    }
    return policies[name]()


@dataclass(frozen=True, slots=True)
class RouteRefused:
    """No upstream may take this request (residency): answered with this JSON error."""

    message: str
    status: int = 503
    kind: str = "no_allowed_upstream"


class Router:
    def __init__(
        self,
        upstreams: tuple["UpstreamConfig", ...],
        settings: RoutingSettings | None = None,
        *,
        sites: Mapping[str, Site] | None = None,
        cost: CostModel | None = None,
        default_intensity: IntensityProvider | None = None,
        default_pue: float = 1.58,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or RoutingSettings()
        self.table = RouteTable(upstreams)
        self.sites: dict[str, Site] = dict(sites) if sites is not None else build_sites(
            upstreams, default_intensity=default_intensity or ConstantIntensity(475.0), default_pue=default_pue, clock=wall_clock
        )
        self.cost: CostModel = cost or LearnedCostModel(default_output_tokens=self.settings.default_output_tokens)
        self.policy = make_policy(self.settings.policy)
        self.baseline = make_policy(self.settings.baseline) if self.settings.baseline != self.settings.policy else None
        self.states = {u.name: UpstreamState(u.name) for u in upstreams}
        self._shares: dict[str, ShareWindow] = {}
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = random.Random(self.settings.seed)
        self._regions = self.settings.regions
        self._awaiting: set[int] = set()  # ids of decisions started, not yet answered
        self._single = {
            u.name: RouteDecision(u, self.settings.policy, 1, 0.0, self.settings.baseline, u.name, 0.0, zone=self.sites[u.name].zone)
            for u in upstreams
        }

    @property
    def needs_model(self) -> bool:
        return self.table.needs_model

    def needs_body(self, path: str, model: str | None) -> bool:
        """True when the body matters for this request's choice (a pool of several)."""
        return len(self.table.pool(path, model)) > 1

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        for site in self.sites.values():
            if site.own_intensity:
                await site.intensity.start()

    async def close(self) -> None:
        for site in self.sites.values():
            if site.own_intensity:
                await site.intensity.close()

    # -- choosing -----------------------------------------------------------------------

    def route(
        self, path: str, model: str | None, *, tenant: str | None = None, body: Mapping[str, Any] | None = None
    ) -> RouteDecision | RouteRefused | None:
        pool = self.table.pool(path, model)
        if not pool:
            return None
        if len(pool) == 1:
            decision = self._single[pool[0].name]
            allowed = self._regions.get(tenant) if tenant is not None else None
            if allowed is not None and decision.zone not in allowed:
                return RouteRefused(f"tenant {tenant!r} may only run in zones {list(allowed)}; "
                                    f"the upstream for this request is in {decision.zone or 'no configured zone'}")
            return decision
        return self._choose(pool, model, tenant, body)

    def predict(self, name: str, prompt_tokens: int, output_tokens: int, wall_unix: float | None = None) -> Prediction:
        site = self.sites[name]
        reading = site.intensity.at(self._wall_clock() if wall_unix is None else wall_unix)
        return Prediction(
            joules=self.cost.predict_joules(name, prompt_tokens, output_tokens),
            pue=site.pue,
            intensity_g_per_kwh=reading.g_per_kwh,
            embodied_grams=self.cost.predict_embodied_grams(name, prompt_tokens, output_tokens),
        )

    def _choose(self, pool: Pool, model: str | None, tenant: str | None, body: Mapping[str, Any] | None) -> RouteDecision | RouteRefused:
        key = "|".join(u.name for u in pool)
        shares = self._shares.get(key)
        if shares is None:
            shares = self._shares[key] = ShareWindow(self.settings.share_window)
        request = read_request(body, model)
        output_tokens = self.cost.expected_output_tokens(model, request.max_tokens)
        wall = self._wall_clock()
        candidates = [
            Candidate(u, self.sites[u.name], self.states[u.name], self.predict(u.name, request.prompt_tokens, output_tokens, wall))
            for u in pool
        ]
        result = apply_guards(
            candidates, self.settings, tenant=tenant, shares=shares, now=self._clock(), prompt_tokens=request.prompt_tokens
        )
        if result.refusal is not None:
            return RouteRefused(result.refusal)
        explored = (
            self.settings.explore_share > 0 and len(result.eligible) > 1 and self._rng.random() < self.settings.explore_share
        )
        chosen = self._rng.choice(result.eligible) if explored else self.policy.choose(key, result.eligible)
        baseline = self.baseline.choose(key, result.resident) if self.baseline is not None else chosen
        shares.add(chosen.name)
        return RouteDecision(
            upstream=chosen.upstream,
            policy=self.settings.policy,
            pool_size=len(pool),
            predicted_grams=chosen.prediction.grams,
            baseline=self.settings.baseline,
            baseline_upstream=baseline.name,
            baseline_grams=baseline.prediction.grams,
            explored=explored,
            zone=chosen.site.zone,
            prompt_tokens=request.prompt_tokens,
        )

    # -- feedback -----------------------------------------------------------------------

    def started(self, decision: RouteDecision) -> None:
        state = self.states[decision.upstream.name]
        state.in_flight += 1
        if decision.pool_size > 1:
            state.queued_tokens += decision.prompt_tokens
            self._awaiting.add(id(decision))

    def first_byte(self, decision: RouteDecision) -> None:
        """The upstream answered (response headers): the prompt has left its backlog."""
        if id(decision) in self._awaiting:
            self._awaiting.discard(id(decision))
            state = self.states[decision.upstream.name]
            state.queued_tokens = max(0, state.queued_tokens - decision.prompt_tokens)

    def finished(self, decision: RouteDecision) -> None:
        self.first_byte(decision)  # no-op when it already answered
        state = self.states[decision.upstream.name]
        state.in_flight = max(0, state.in_flight - 1)

    def record_result(self, upstream: str, outcome: str, status_code: int, ttft_seconds: float | None) -> None:
        state = self.states.get(upstream)
        if state is None or outcome in NOT_COUNTED:
            return
        now = self._clock()
        state.record_outcome(
            is_failure(outcome, status_code), now,
            after_failures=self.settings.unhealthy_after_failures, down_seconds=self.settings.unhealthy_seconds,
        )
        if ttft_seconds is not None and ttft_seconds >= 0:
            state.record_ttft(ttft_seconds, now, self.settings.latency_window_seconds)

    def observe(self, receipt: "Receipt", *_: object) -> None:
        """ProxyServer.on_record listener."""
        if receipt.status == "provisional":
            self.record_result(receipt.upstream, receipt.outcome, receipt.status_code, receipt.time_to_first_byte_seconds)
        elif receipt.outcome == "ok" and receipt.output_tokens:
            self.cost.observe(
                receipt.upstream, receipt.model, receipt.prompt_tokens or 0, receipt.output_tokens,
                receipt.energy_joules, receipt.embodied_grams,
            )
