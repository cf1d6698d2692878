"""`carbon`: the eligible upstream with the lowest predicted grams for this request.

Predicted grams = predicted energy there (its learned cost model) x its PUE x its grid
intensity now + its embodied share. The guards (proxy.routing.guards) have already
removed unhealthy, slow, over-share and out-of-region upstreams; exploration is the
router's job. Ties (equal predictions) go to the one with fewer requests in flight.
"""

from __future__ import annotations

from typing import Sequence

from proxy.routing.policy import Candidate


class CarbonPolicy:
    name = "carbon"

    def choose(self, pool_key: str, candidates: Sequence[Candidate]) -> Candidate:
        return min(candidates, key=lambda c: (c.prediction.grams, c.state.in_flight))
