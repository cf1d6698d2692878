"""What a request will cost on an upstream: the small interface the router depends on.

The attribution engine learns each device group's cost function in detail; the router
needs far less (which upstream is cheaper for this request), so it depends only on
`CostModel`, and the default implementation learns from settled receipts: per upstream,
joules and embodied grams per unit of work, work = prefill_weight x prompt tokens +
output tokens (DESIGN.md section 5). Another model (the engine's own, once it exposes
one) can replace it without touching the router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PREFILL_WEIGHT = 0.15
"""A prompt token costs about this fraction of an output token (batched prefill vs decode);
the same order the attribution engine starts from. Only the ranking between upstreams
depends on it, and that barely: every candidate sees the same prompt."""


class CostModel(Protocol):
    def predict_joules(self, upstream: str, prompt_tokens: int, output_tokens: int) -> float:
        """IT energy (before PUE) this request is expected to take on `upstream`."""
        ...

    def predict_embodied_grams(self, upstream: str, prompt_tokens: int, output_tokens: int) -> float:
        """Its share of the hardware's embodied carbon there."""
        ...

    def expected_output_tokens(self, model: str | None, max_tokens: int | None) -> int:
        """How many tokens the reply will likely have."""
        ...

    def observe(
        self, upstream: str, model: str | None, prompt_tokens: int, output_tokens: int, joules: float, embodied_grams: float
    ) -> None:
        """A settled request: learn from it."""
        ...

    def samples(self, upstream: str) -> int:
        """How many settled requests the estimate for `upstream` rests on."""
        ...


@dataclass(slots=True)
class _Rate:
    joules: float = 0.0
    embodied_grams: float = 0.0
    work: float = 0.0
    count: int = 0


class LearnedCostModel:
    """Per-upstream joules (and embodied grams) per work unit, from settled receipts.

    Sums decay by `memory` per observation (an exponential window of about 1/(1-memory)
    requests), so a model server that gets slower or faster is followed. Before an
    upstream has data, the mean rate of those that have is used, else `prior`.
    """

    def __init__(
        self,
        *,
        prior_joules_per_token: float = 2.0,
        prior_embodied_grams_per_token: float = 0.0,
        default_output_tokens: int = 256,
        memory: float = 0.995,
        prefill_weight: float = PREFILL_WEIGHT,
    ) -> None:
        self.prior_joules_per_token = prior_joules_per_token
        self.prior_embodied_grams_per_token = prior_embodied_grams_per_token
        self.default_output_tokens = default_output_tokens
        self.memory = memory
        self.prefill_weight = prefill_weight
        self._rates: dict[str, _Rate] = {}
        self._outputs: dict[str | None, tuple[float, float]] = {}  # model -> (decayed sum, decayed count)

    def work(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.prefill_weight * max(0, prompt_tokens) + max(0, output_tokens)

    def joules_per_token(self, upstream: str) -> float:
        rate = self._rates.get(upstream)
        if rate is not None and rate.work > 0:
            return rate.joules / rate.work
        known = [r.joules / r.work for r in self._rates.values() if r.work > 0]
        return sum(known) / len(known) if known else self.prior_joules_per_token

    def embodied_grams_per_token(self, upstream: str) -> float:
        rate = self._rates.get(upstream)
        if rate is not None and rate.work > 0:
            return rate.embodied_grams / rate.work
        known = [r.embodied_grams / r.work for r in self._rates.values() if r.work > 0]
        return sum(known) / len(known) if known else self.prior_embodied_grams_per_token

    def predict_joules(self, upstream: str, prompt_tokens: int, output_tokens: int) -> float:
        return self.joules_per_token(upstream) * self.work(prompt_tokens, output_tokens)

    def predict_embodied_grams(self, upstream: str, prompt_tokens: int, output_tokens: int) -> float:
        return self.embodied_grams_per_token(upstream) * self.work(prompt_tokens, output_tokens)

    def expected_output_tokens(self, model: str | None, max_tokens: int | None) -> int:
        history = self._outputs.get(model)
        mean = history[0] / history[1] if history and history[1] > 0 else None
        if max_tokens is not None and max_tokens > 0:
            return max(1, round(min(max_tokens, mean))) if mean is not None else max_tokens
        return max(1, round(mean)) if mean is not None else self.default_output_tokens

    def observe(
        self, upstream: str, model: str | None, prompt_tokens: int, output_tokens: int, joules: float, embodied_grams: float
    ) -> None:
        work = self.work(prompt_tokens, output_tokens)
        if work <= 0 or not joules >= 0:
            return
        rate = self._rates.setdefault(upstream, _Rate())
        rate.joules = rate.joules * self.memory + joules
        rate.embodied_grams = rate.embodied_grams * self.memory + max(0.0, embodied_grams)
        rate.work = rate.work * self.memory + work
        rate.count += 1
        total, count = self._outputs.get(model, (0.0, 0.0))
        self._outputs[model] = (total * self.memory + output_tokens, count * self.memory + 1.0)

    def samples(self, upstream: str) -> int:
        rate = self._rates.get(upstream)
        return rate.count if rate is not None else 0
