"""Every guard holds: unhealthy, over the latency objective, share cap, exploration, residency."""

from __future__ import annotations

from collections import Counter

from routing_fakes import Clock, make_router
from proxy.routing.header import RouteDecision
from proxy.routing.router import RouteRefused

BODY = {"model": "m", "max_tokens": 50}
# "clean" is always the carbon choice unless a guard removes it.
PLACES = {"clean": ("SE", 30), "mid": ("FR", 90), "dirty": ("DE", 450)}
COSTS = {"clean": 1.0, "mid": 1.0, "dirty": 1.0}


def _pick(router, tenant=None) -> str:
    decision = router.route("/v1/chat/completions", "m", tenant=tenant, body=BODY)
    assert isinstance(decision, RouteDecision), decision
    return decision.upstream.name


def test_unhealthy_upstream_is_skipped_until_its_cooldown_ends() -> None:
    clock = Clock()
    router, _ = make_router(PLACES, COSTS, clock=clock,
                            routing={"policy": "carbon", "unhealthy_after_failures": 2, "unhealthy_seconds": 5})
    router.record_result("clean", "upstream_unreachable", 502, None)
    assert _pick(router) == "clean"  # one failure is not yet a pattern
    router.record_result("clean", "ok", 500, 0.1)  # a 5xx counts as a failure too
    assert _pick(router) == "mid"
    router.record_result("clean", "client_disconnected", 200, None)  # says nothing about the upstream
    clock.now += 5.0
    assert _pick(router) == "clean"  # cooldown over: probed again
    router.record_result("clean", "ok", 200, 0.1)
    assert router.states["clean"].consecutive_failures == 0


def test_all_unhealthy_keeps_serving_rather_than_failing_the_pool() -> None:
    router, _ = make_router(PLACES, COSTS, routing={"policy": "carbon", "unhealthy_after_failures": 1})
    for name in PLACES:
        router.record_result(name, "upstream_timeout", 504, None)
    assert _pick(router) == "clean"


def test_healthy_only_can_be_switched_off() -> None:
    router, _ = make_router(PLACES, COSTS, routing={"policy": "carbon", "unhealthy_after_failures": 1, "healthy_only": False})
    router.record_result("clean", "upstream_broken", 0, None)
    assert _pick(router) == "clean"


def test_over_the_ttft_objective_is_skipped_and_comes_back_when_the_window_ages() -> None:
    clock = Clock()
    router, _ = make_router(PLACES, COSTS, clock=clock,
                            routing={"policy": "carbon", "max_ttft_p95_seconds": 1.0, "latency_window_seconds": 30})
    for _ in range(20):
        router.record_result("clean", "ok", 200, 3.0)
    assert _pick(router) == "mid"
    clock.now += 31.0
    assert _pick(router) == "clean"


def test_in_flight_limit_spills_to_the_next_cleanest() -> None:
    router, _ = make_router(PLACES, COSTS, routing={"policy": "carbon", "max_in_flight": 2})
    picks = []
    for _ in range(5):
        decision = router.route("/v1/chat/completions", "m", body=BODY)
        router.started(decision)
        picks.append(decision.upstream.name)
    assert picks == ["clean", "clean", "mid", "mid", "dirty"]


def test_share_cap_holds() -> None:
    router, _ = make_router(PLACES, COSTS, routing={"policy": "carbon", "max_share": 0.5, "share_window": 100})
    counts = Counter(_pick(router) for _ in range(400))
    assert counts["clean"] <= 0.5 * 400 + 1
    assert counts["mid"] > counts["dirty"]  # the spill goes to the next cleanest


def test_exploration_reaches_every_upstream_at_about_its_share() -> None:
    router, _ = make_router(PLACES, COSTS, routing={"policy": "carbon", "explore_share": 0.1, "seed": 3})
    decisions = [router.route("/v1/chat/completions", "m", body=BODY) for _ in range(2000)]
    explored = [d for d in decisions if d.explored]
    assert 0.07 * 2000 < len(explored) < 0.13 * 2000
    assert {d.upstream.name for d in explored} == set(PLACES)
    assert all(d.upstream.name == "clean" for d in decisions if not d.explored)


def test_residency_never_leaves_the_allowed_zones() -> None:
    router, _ = make_router(PLACES, COSTS, tenants={"regions": {"fr-only": ["FR"], "de-se": ["DE", "SE"]}},
                            routing={"policy": "carbon", "explore_share": 0.3, "max_share": 0.4, "seed": 1})
    assert {_pick(router, "fr-only") for _ in range(200)} == {"mid"}  # not clean, whatever exploration or the cap say
    assert {_pick(router, "de-se") for _ in range(200)} <= {"clean", "dirty"}


def test_residency_refuses_with_a_clear_error_instead_of_spilling() -> None:
    router, _ = make_router(PLACES, COSTS, tenants={"regions": {"us-only": ["US-CAL-CISO"], "se-only": ["SE"]}},
                            routing={"policy": "carbon", "unhealthy_after_failures": 1})
    refused = router.route("/v1/chat/completions", "m", tenant="us-only", body=BODY)
    assert isinstance(refused, RouteRefused) and refused.kind == "no_allowed_upstream"
    assert "US-CAL-CISO" in refused.message and "DE" in refused.message
    router.record_result("clean", "upstream_unreachable", 502, None)  # SE's only upstream is down
    refused = router.route("/v1/chat/completions", "m", tenant="se-only", body=BODY)
    assert isinstance(refused, RouteRefused) and "healthy" in refused.message
    assert _pick(router) == "mid"  # tenants without regions still get served


def test_prefill_backlog_limit_reacts_before_any_ttft_is_known() -> None:
    router, _ = make_router(PLACES, COSTS, routing={"policy": "carbon", "max_queued_tokens": 250})
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}  # ~100 prompt tokens
    picks = []
    decisions = []
    for _ in range(3):
        decision = router.route("/v1/chat/completions", "m", body=body)
        router.started(decision)
        decisions.append(decision)
        picks.append(decision.upstream.name)
    assert picks == ["clean", "clean", "mid"]  # a third 100 would pass 250 waiting at "clean"
    router.first_byte(decisions[0])  # "clean" answered one: its backlog shrinks
    assert router.route("/v1/chat/completions", "m", body=body).upstream.name == "clean"
    router.finished(decisions[0])  # finishing after the first byte does not count it twice
    assert router.states["clean"].queued_tokens == 100
