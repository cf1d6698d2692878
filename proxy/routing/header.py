"""`X-Carbon-Route`: where a request went, and what the baseline policy would have emitted.

    X-Carbon-Route: upstream=nordic; predicted_grams=0.0121; baseline=round_robin;
        baseline_upstream=central; baseline_grams=0.0463; avoided_grams=0.0342;
        counterfactual=predicted

Both gram figures are predictions made at routing time with the same cost model, so the
difference compares like with like; the settled figure of the request itself is in the
usual X-CO2e-Grams / receipt. `explored=true` marks an exploration pick.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.config import UpstreamConfig

HEADER = "X-Carbon-Route"


def _grams(value: float) -> str:
    return f"{value:.6g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.3e}"


@dataclass(frozen=True, slots=True)
class RouteDecision:
    upstream: "UpstreamConfig"
    policy: str
    pool_size: int
    predicted_grams: float
    baseline: str
    baseline_upstream: str
    baseline_grams: float
    explored: bool = False
    zone: str | None = None
    prompt_tokens: int = 0
    """The router's estimate, held until the upstream answers (its prefill backlog)."""

    @property
    def avoided_grams(self) -> float:
        """Predicted grams of the baseline's choice minus those of this one (negative: more)."""
        return self.baseline_grams - self.predicted_grams

    def header_value(self) -> str:
        parts = [
            f"upstream={self.upstream.name}",
            f"predicted_grams={_grams(self.predicted_grams)}",
            f"baseline={self.baseline}",
            f"baseline_upstream={self.baseline_upstream}",
            f"baseline_grams={_grams(self.baseline_grams)}",
            f"avoided_grams={_grams(self.avoided_grams)}",
            "counterfactual=predicted",
        ]
        if self.explored:
            parts.append("explored=true")
        return "; ".join(parts)


def parse_header(value: str) -> dict[str, str]:
    """The header's fields as a dict (for clients, tests and the report)."""
    fields: dict[str, str] = {}
    for part in value.split(";"):
        name, sep, text = part.strip().partition("=")
        if sep:
            fields[name] = text
    return fields
