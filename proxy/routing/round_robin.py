"""`round_robin`: each pool's eligible upstreams in turn."""

from __future__ import annotations

from typing import Sequence

from proxy.routing.policy import Candidate


class RoundRobinPolicy:
    name = "round_robin"

    def __init__(self) -> None:
        self._turns: dict[str, int] = {}

    def choose(self, pool_key: str, candidates: Sequence[Candidate]) -> Candidate:
        turn = self._turns.get(pool_key, 0)
        self._turns[pool_key] = turn + 1
        return candidates[turn % len(candidates)]
