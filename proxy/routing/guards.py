"""Guards: which members of a pool a policy may choose from, and why others were skipped.

In order, each configurable in [routing]:
1. residency (hard): a tenant with [tenants.regions] only runs in those zones. No
   member there, or none of those healthy: the request is refused with a clear error;
   it never spills into another zone.
2. healthy_only: skip members with recent connect failures / 5xx (passive health).
   If that leaves none (and no residency applies), all are kept: a wrong health guess
   must not take a whole pool down, and the cooldown probes them again anyway.
3. latency objective: skip members whose recent TTFT p95 is over
   max_ttft_p95_seconds, whose in-flight count is at max_in_flight, or whose prefill
   backlog (prompt tokens sent, no first byte yet) would pass max_queued_tokens. The
   last reacts at once; TTFT is only known when a request ends.
4. share cap: skip members that took max_share or more of the pool's recent requests.
Guards 3 and 4 are soft: if one would leave nothing, it is not applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from proxy.routing.policy import Candidate
from proxy.routing.settings import RoutingSettings
from proxy.routing.state import ShareWindow


@dataclass(slots=True)
class GuardResult:
    eligible: list[Candidate]
    skipped: dict[str, str] = field(default_factory=dict)
    """Upstream name -> why it was not eligible (for logs and tests)."""
    refusal: str | None = None
    """Set when residency leaves nothing to choose: the message for the client."""
    resident: list[Candidate] = field(default_factory=list)
    """Members allowed by residency and health: the set the baseline chooses from."""


def apply_guards(
    candidates: Sequence[Candidate],
    settings: RoutingSettings,
    *,
    tenant: str | None,
    shares: ShareWindow,
    now: float,
    prompt_tokens: int = 0,
) -> GuardResult:
    skipped: dict[str, str] = {}
    pool = list(candidates)
    allowed_zones = settings.regions.get(tenant) if tenant is not None else None
    if allowed_zones is not None:
        inside = [c for c in pool if c.site.zone in allowed_zones]
        for c in pool:
            if c not in inside:
                skipped[c.name] = f"residency: zone {c.site.zone or 'unknown'} is not in {list(allowed_zones)}"
        if not inside:
            zones = sorted({c.site.zone or "unknown" for c in pool})
            return GuardResult([], skipped, f"tenant {tenant!r} may only run in zones {list(allowed_zones)}; "
                                            f"this pool's upstreams are in {zones}")
        pool = inside
    if settings.healthy_only:
        healthy = [c for c in pool if c.state.healthy(now)]
        for c in pool:
            if c not in healthy:
                skipped[c.name] = f"unhealthy: {c.state.consecutive_failures} failures in a row"
        if not healthy and allowed_zones is not None:
            return GuardResult([], skipped, f"no healthy upstream in tenant {tenant!r}'s allowed zones "
                                            f"{list(allowed_zones)}; not sending it elsewhere")
        pool = healthy or pool
    resident = list(pool)
    if settings.max_ttft_p95_seconds > 0 or settings.max_in_flight > 0 or settings.max_queued_tokens > 0:
        fast = []
        for c in pool:
            p95 = c.state.ttft_p95(now, settings.latency_window_seconds) if settings.max_ttft_p95_seconds > 0 else None
            if p95 is not None and p95 > settings.max_ttft_p95_seconds:
                skipped[c.name] = f"latency: TTFT p95 {p95:.3g}s over {settings.max_ttft_p95_seconds:g}s"
            elif settings.max_in_flight > 0 and c.state.in_flight >= settings.max_in_flight:
                skipped[c.name] = f"latency: {c.state.in_flight} in flight, limit {settings.max_in_flight}"
            elif settings.max_queued_tokens > 0 and c.state.queued_tokens + prompt_tokens > settings.max_queued_tokens and c.state.queued_tokens > 0:
                skipped[c.name] = f"latency: {c.state.queued_tokens} prompt tokens waiting, limit {settings.max_queued_tokens}"
            else:
                fast.append(c)
        pool = fast or pool
    if settings.max_share > 0 and len(pool) > 1 and len(shares) > 0:
        under = [c for c in pool if shares.share(c.name) < settings.max_share]
        for c in pool:
            if c not in under:
                skipped[c.name] = f"share: {shares.share(c.name):.0%} of recent requests, cap {settings.max_share:.0%}"
        pool = under or pool
    return GuardResult(pool, skipped, None, resident)
