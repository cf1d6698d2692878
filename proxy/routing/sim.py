"""A fleet of simulated model servers in several zones, in virtual time, behind the real router.

For tests and bench/routing.py: each site is a batching engine (proxy.sim.engine) on a
SimGpu with its own speed and power (so sites differ in joules per token), priced with
its zone's moving intensity (proxy.carbon.traces), its PUE and its embodied rate. The
requests go through `Router.route()` exactly as in the proxy; what the proxy learns
from the wire (time to first byte, settled energy) is fed back the same way: TTFT and
outcome to `record_result`, and the request's exact energy (the sim's ground truth,
standing in for the settled receipt) to the cost model.

Two totals per run:
- request grams: what receipts would say (dynamic energy, the static share while a
  request is present, x PUE x intensity when it ended, + embodied share by time);
- fleet grams: every joule the sites drew, idle included, x PUE x intensity at the
  time, + all sites' embodied carbon for the whole run (the hardware exists anyway).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

from proxy.carbon.traces import TraceIntensity
from proxy.config import config_from_dict
from proxy.routing.cost import LearnedCostModel
from proxy.routing.header import RouteDecision
from proxy.routing.place import Site
from proxy.routing.router import Router
from proxy.routing.settings import parse_routing
from proxy.sim.clock import VirtualClock
from proxy.sim.config import SimModelConfig
from proxy.sim.engine import BatchEngine, SimSequence
from proxy.sim.gpu import SimGpu
from proxy.sim.power import PowerModel

JOULES_PER_KWH = 3.6e6
MODEL = "sim-llm"


@dataclass(frozen=True, slots=True)
class FleetSite:
    name: str
    zone: str
    """A zone of proxy.carbon.traces."""
    tokens_per_second: float
    idle_power_watts: float
    max_power_watts: float
    power: PowerModel = PowerModel()
    pue: float = 1.2
    embodied_g_per_second: float = 0.0015
    """The server's embodied carbon per second of its life (H100 ~164 kg + server share over ~5 years)."""
    prefill_seconds_per_token: float = 0.0002


@dataclass(frozen=True, slots=True)
class FleetRequest:
    request_id: str
    arrival_seconds: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int | None


@dataclass(slots=True)
class FleetOutcome:
    request: FleetRequest
    site: str
    decision: RouteDecision
    ttft_seconds: float | None = None
    finished_seconds: float | None = None
    joules: float = 0.0
    operational_grams: float = 0.0
    embodied_grams: float = 0.0
    intensity_g_per_kwh: float = 0.0
    pue: float = 1.0

    @property
    def grams(self) -> float:
        return self.operational_grams + self.embodied_grams


@dataclass(slots=True)
class FleetRun:
    policy: str
    outcomes: list[FleetOutcome]
    fleet_joules: float
    fleet_facility_joules: float
    fleet_operational_grams: float
    fleet_embodied_grams: float
    duration_seconds: float
    per_site: dict[str, int] = field(default_factory=dict)


def request_stream(
    *, seconds: float, rate_per_second: float, seed: int, prompt_median: int = 400, output_range: tuple[int, int] = (40, 400)
) -> list[FleetRequest]:
    """A Poisson stream: log-normal prompts around `prompt_median`, uniform output lengths."""
    rng = random.Random(seed)
    requests, t, i = [], 0.0, 0
    while True:
        t += rng.expovariate(rate_per_second)
        if t >= seconds:
            return requests
        prompt = max(8, min(4000, round(rng.lognormvariate(0, 0.7) * prompt_median)))
        output = rng.randint(*output_range)
        requests.append(FleetRequest(f"r{i}", t, prompt, output, rng.choice((None, 512, 1024))))
        i += 1


class _FirstToken:
    """Tells the router when the first token (the response's first byte) leaves."""

    __slots__ = ("router", "decision")

    def __init__(self, router: Router, decision: RouteDecision) -> None:
        self.router = router
        self.decision = decision

    def on_token(self, seq: SimSequence, position: int, index: int) -> None:
        if position == 0:
            self.router.first_byte(self.decision)

    def on_finish(self, seq: SimSequence) -> None:
        return None


class _Site:
    def __init__(self, spec: FleetSite, clock: VirtualClock, day_seconds: float) -> None:
        self.spec = spec
        self.gpu = SimGpu((spec.name,), idle_power_watts=spec.idle_power_watts, max_power_watts=spec.max_power_watts,
                          power_model=spec.power, clock=clock)
        config = SimModelConfig(model=MODEL, tokens_per_second=spec.tokens_per_second,
                                prefill_seconds_per_token=spec.prefill_seconds_per_token)
        self.engine = BatchEngine(config, self.gpu)
        self.intensity = TraceIntensity(spec.zone, day_seconds=day_seconds, clock=clock)
        self.stepping = False
        self.last_joules = 0.0


def run_fleet(
    requests: Iterable[FleetRequest],
    sites: list[FleetSite],
    routing: dict[str, Any],
    *,
    day_seconds: float,
    tenants: dict[str, Any] | None = None,
    sample_seconds: float = 1.0,
) -> FleetRun:
    """Serve the stream on the fleet under `routing` ([routing] keys) and account for it."""
    clock = VirtualClock()
    fleet = {spec.name: _Site(spec, clock, day_seconds) for spec in sites}
    config = config_from_dict({
        "upstreams": [{"name": s.name, "url": f"http://{s.name}.sim", "models": [MODEL], "zone": s.zone, "pue": s.pue} for s in sites],
    })
    router_sites = {s.name: Site(s.name, s.zone.upper(), fleet[s.name].intensity, s.pue, True) for s in sites}
    settings = parse_routing(routing, tenants or {})
    router = Router(config.upstreams, settings, sites=router_sites, cost=LearnedCostModel(), clock=clock, wall_clock=clock)

    events: list[tuple[float, int, int, Any]] = []
    order = 0
    ARRIVE, STEP, SAMPLE = 0, 1, 2
    pending = sorted(requests, key=lambda r: r.arrival_seconds)
    for request in pending:
        heapq.heappush(events, (request.arrival_seconds, order, ARRIVE, request))
        order += 1
    heapq.heappush(events, (0.0, order, SAMPLE, None))
    outcomes: list[FleetOutcome] = []
    arrivals_left = len(pending)
    fleet_facility = fleet_joules = fleet_grams = 0.0
    last_sample = 0.0

    def done(outcome: FleetOutcome, site: _Site, seq: SimSequence) -> None:
        now = clock()
        site.gpu.request_departed(seq.request_id, now)
        router.finished(outcome.decision)
        outcome.finished_seconds = now
        if seq.first_token_seconds is not None:
            outcome.ttft_seconds = seq.first_token_seconds - outcome.request.arrival_seconds
        truth = site.gpu.ground_truth(seq.request_id, now)
        spec = site.spec
        outcome.joules = truth.total_joules
        outcome.pue = spec.pue
        outcome.intensity_g_per_kwh = site.intensity.at(now).g_per_kwh
        outcome.operational_grams = outcome.joules / JOULES_PER_KWH * spec.pue * outcome.intensity_g_per_kwh
        reserved_seconds = truth.static_joules / spec.idle_power_watts if spec.idle_power_watts > 0 else 0.0
        outcome.embodied_grams = reserved_seconds * spec.embodied_g_per_second
        router.record_result(spec.name, "ok", 200, outcome.ttft_seconds)
        router.cost.observe(spec.name, MODEL, outcome.request.prompt_tokens, seq.generated_tokens, outcome.joules,
                            outcome.embodied_grams)

    while events:
        at, _, kind, payload = heapq.heappop(events)
        busy = any(s.stepping or s.engine.has_work() for s in fleet.values())
        if kind == SAMPLE and not arrivals_left and not busy:
            break
        clock.seconds = max(clock.seconds, at)
        now = clock()
        if kind == ARRIVE:
            arrivals_left -= 1
            request: FleetRequest = payload
            body = {"model": MODEL, "max_tokens": request.max_tokens, "messages": [{"content": "x" * (4 * request.prompt_tokens)}]}
            decision = router.route("/v1/chat/completions", MODEL, body=body)
            assert isinstance(decision, RouteDecision)
            router.started(decision)
            site = fleet[decision.upstream.name]
            outcome = FleetOutcome(request, site.spec.name, decision)
            outcomes.append(outcome)
            site.gpu.request_arrived(request.request_id, now)
            output = min(request.output_tokens, request.max_tokens or request.output_tokens)
            seq = SimSequence(request.request_id, request.prompt_tokens, output, "stop", seed=order,
                              sink=_FirstToken(router, decision))
            seq.on_done = lambda s, o=outcome, st=site: done(o, st, s)
            site.engine.submit(seq, now)
        elif kind == STEP:
            site = fleet[payload]
            site.engine.finish_step(now)
            site.stepping = False
        else:
            # Fleet energy since the last sample, priced at each site's intensity mid-interval.
            for site in fleet.values():
                joules = site.gpu.energy_joules(now)
                delta = joules - site.last_joules
                site.last_joules = joules
                mid = site.intensity.at((last_sample + now) / 2).g_per_kwh
                fleet_joules += delta
                fleet_facility += delta * site.spec.pue
                fleet_grams += delta / JOULES_PER_KWH * site.spec.pue * mid
            last_sample = now
            heapq.heappush(events, (now + sample_seconds, order, SAMPLE, None))
        order += 1
        for name, site in fleet.items():
            if not site.stepping:
                duration = site.engine.start_step(now)
                if duration is not None:
                    site.stepping = True
                    heapq.heappush(events, (now + duration, order, STEP, name))
                    order += 1
    duration = clock()
    embodied = sum(s.embodied_g_per_second for s in sites) * duration
    per_site: dict[str, int] = {}
    for outcome in outcomes:
        per_site[outcome.site] = per_site.get(outcome.site, 0) + 1
    return FleetRun(settings.policy, outcomes, fleet_joules, fleet_facility, fleet_grams, embodied, duration, per_site)
