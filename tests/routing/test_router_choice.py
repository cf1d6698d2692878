"""The router's choice on scripted costs and intensities, and the avoided-grams arithmetic."""

from __future__ import annotations

import pytest

from routing_fakes import make_router
from proxy.routing.header import RouteDecision, parse_header
from proxy.routing.policy import JOULES_PER_KWH
from proxy.routing.router import RouteRefused

BODY = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "x" * 400}]}


def _route(router, tenant=None, body=BODY) -> RouteDecision:
    decision = router.route("/v1/chat/completions", "m", tenant=tenant, body=body)
    assert isinstance(decision, RouteDecision), decision
    return decision


def test_carbon_picks_the_lowest_energy_times_intensity() -> None:
    # grams = J/token x 100 tokens x g/kWh / 3.6e6: a 200, b 100 (cleanest grid but less
    # efficient), c 125 (most efficient, dirtier grid).
    router, grid = make_router({"a": ("DE", 400), "b": ("SE", 50), "c": ("FR", 500)}, {"a": 5.0, "b": 20.0, "c": 2.5})
    decision = _route(router)
    assert decision.upstream.name == "b"
    assert decision.predicted_grams == pytest.approx(20.0 * 100 * 50 / JOULES_PER_KWH)
    grid["b"].g_per_kwh = 1000.0  # the wind dropped: b is now the dirtiest
    assert _route(router).upstream.name == "c"


def test_embodied_grams_count_in_the_choice() -> None:
    router, _ = make_router({"a": ("DE", 100), "b": ("SE", 100)}, {"a": 1.0, "b": 1.0}, embodied={"a": 0.0, "b": 0.001})
    assert _route(router).upstream.name == "a"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("first", ["a", "a", "a", "a"]), ("round_robin", ["a", "b", "c", "a"]), ("carbon", ["c", "c", "c", "c"])],
)
def test_comparison_policies(policy: str, expected: list[str]) -> None:
    router, _ = make_router({"a": ("DE", 400), "b": ("DE", 300), "c": ("SE", 30)}, {"a": 1.0, "b": 1.0, "c": 1.0},
                            routing={"policy": policy})
    assert [_route(router).upstream.name for _ in expected] == expected


def test_least_in_flight_follows_the_open_requests() -> None:
    router, _ = make_router({"a": ("DE", 1), "b": ("DE", 1)}, {"a": 1.0, "b": 1.0}, routing={"policy": "least_in_flight"})
    first = _route(router)
    router.started(first)
    second = _route(router)
    assert (first.upstream.name, second.upstream.name) == ("a", "b")
    router.started(second)
    router.finished(first)
    assert _route(router).upstream.name == "a"


def test_header_names_the_choice_the_baseline_and_the_difference() -> None:
    router, _ = make_router({"a": ("DE", 400), "b": ("SE", 40)}, {"a": 1.0, "b": 1.0},
                            routing={"policy": "carbon", "baseline": "round_robin"})
    first, second = _route(router), _route(router)
    fields = parse_header(first.header_value())
    assert fields["upstream"] == "b" and fields["baseline"] == "round_robin" and fields["baseline_upstream"] == "a"
    assert float(fields["avoided_grams"]) == pytest.approx(float(fields["baseline_grams"]) - float(fields["predicted_grams"]), rel=1e-5)
    assert fields["counterfactual"] == "predicted"
    # Round robin's second turn would have been b itself: nothing avoided.
    assert second.baseline_upstream == "b" and second.avoided_grams == 0.0


def test_avoided_grams_add_up_over_a_run() -> None:
    router, grid = make_router({"a": ("DE", 400), "b": ("SE", 40), "c": ("FR", 90)}, {"a": 1.0, "b": 3.0, "c": 1.5},
                               routing={"policy": "carbon", "explore_share": 0.2, "seed": 7})
    decisions = []
    for i in range(300):
        grid["b"].g_per_kwh = 40 + (i % 50) * 8  # moves past the others and back
        decisions.append(_route(router, body={"model": "m", "max_tokens": 10 + i % 90}))
    avoided = sum(d.avoided_grams for d in decisions)
    assert avoided == pytest.approx(sum(d.baseline_grams for d in decisions) - sum(d.predicted_grams for d in decisions))
    assert avoided > 0
    # From the headers alone, as a client or the report would add them:
    from_headers = sum(float(parse_header(d.header_value())["avoided_grams"]) for d in decisions)
    assert from_headers == pytest.approx(avoided, rel=1e-4)
    explored = [d for d in decisions if d.explored]
    assert explored and any(d.avoided_grams < 0 for d in explored)  # exploration can cost, and says so


def test_a_pool_of_one_carries_no_route_header_but_keeps_residency() -> None:
    router, _ = make_router({"solo": ("DE", 400)}, {"solo": 1.0}, tenants={"regions": {"eu-only": ["SE"]}})
    decision = _route(router)
    assert decision.pool_size == 1 and decision.upstream.name == "solo"
    refused = router.route("/v1/chat/completions", "m", tenant="eu-only", body=BODY)
    assert isinstance(refused, RouteRefused) and "SE" in refused.message and refused.status == 503
