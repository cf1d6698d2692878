"""`least_in_flight`: the eligible upstream with the fewest requests in flight (ties: config order)."""

from __future__ import annotations

from typing import Sequence

from proxy.routing.policy import Candidate


class LeastInFlightPolicy:
    name = "least_in_flight"

    def choose(self, pool_key: str, candidates: Sequence[Candidate]) -> Candidate:
        return min(candidates, key=lambda c: c.state.in_flight)
