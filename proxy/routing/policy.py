"""The shapes every policy shares: a candidate upstream with its predicted cost, and the
Policy interface (choose one candidate of a pool's eligible members)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from proxy.routing.place import Site
from proxy.routing.state import UpstreamState

if TYPE_CHECKING:
    from proxy.config import UpstreamConfig

JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True, slots=True)
class Prediction:
    """Predicted grams of one request on one upstream: E x PUE x I + M (a prediction, not a measurement)."""

    joules: float
    pue: float
    intensity_g_per_kwh: float
    embodied_grams: float

    @property
    def operational_grams(self) -> float:
        return self.joules / JOULES_PER_KWH * self.pue * self.intensity_g_per_kwh

    @property
    def grams(self) -> float:
        return self.operational_grams + self.embodied_grams


@dataclass(slots=True)
class Candidate:
    upstream: "UpstreamConfig"
    site: Site
    state: UpstreamState
    prediction: Prediction

    @property
    def name(self) -> str:
        return self.upstream.name


class Policy(Protocol):
    name: str

    def choose(self, pool_key: str, candidates: Sequence[Candidate]) -> Candidate:
        """One of `candidates` (never empty, in config order)."""
        ...
