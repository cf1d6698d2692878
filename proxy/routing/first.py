"""`first`: the first eligible upstream of the pool, in config order (failover order)."""

from __future__ import annotations

from typing import Sequence

from proxy.routing.policy import Candidate


class FirstPolicy:
    name = "first"

    def choose(self, pool_key: str, candidates: Sequence[Candidate]) -> Candidate:
        return candidates[0]
