"""Predicted grams of a request before it runs: what a budget reserves.

A request's cost is not known until it ends, so a budget reserves a prediction first:
tokens (the prompt estimate plus the requested output limit, else the model's average
output) times a learned grams-per-token figure of the model. The figure is an upper
estimate: the moving mean plus twice the moving mean absolute deviation of the final
receipts' CO2e per token. Before a model has any final receipt, the prior is
conservative: the dearest figure learned for any model, else PRIOR_GRAMS_PER_TOKEN.

Requests without tokens (diffusion, generic dialects) predict the model's mean grams per
request (plus deviation), else PRIOR_GRAMS_PER_REQUEST. Everything here is in memory,
bounded by MAX_MODELS (model names come from clients), and relearned after a restart.
"""

from __future__ import annotations

from typing import Any

from proxy.dialects.base import parse_json_object
from proxy.receipts.model import Receipt

PRIOR_GRAMS_PER_TOKEN = 1e-3
"""About 20x an 8B model on one modern GPU at 450 g/kWh (0.3 J/token, PUE 1.2): no model
in use is cheaper to predict too high than to overshoot a budget while learning."""
PRIOR_GRAMS_PER_REQUEST = 1.0
"""A diffusion request of a few 1024x1024 images on one GPU is in the 0.1-1 g range."""
DEFAULT_OUTPUT_TOKENS = 256
SMOOTHING = 0.1
"""Weight of a new observation in the moving averages (about the last 20 receipts)."""
DEVIATIONS = 2.0
MAX_MODELS = 200
OTHER_MODELS = "\x00other"

# Request fields that cap the output, per dialect: OpenAI, TGI, llama.cpp, Ollama.
_TOP_LEVEL_LIMITS = ("max_completion_tokens", "max_tokens", "max_new_tokens", "n_predict")


class _Moving:
    __slots__ = ("mean", "deviation", "seen")

    def __init__(self) -> None:
        self.mean = 0.0
        self.deviation = 0.0
        self.seen = 0

    def add(self, value: float) -> None:
        if self.seen == 0:
            self.mean, self.deviation = value, value / 2  # one sample: assume a wide spread
        else:
            self.deviation += SMOOTHING * (abs(value - self.mean) - self.deviation)
            self.mean += SMOOTHING * (value - self.mean)
        self.seen += 1

    def upper(self) -> float:
        return self.mean + DEVIATIONS * self.deviation


class _ModelCost:
    __slots__ = ("per_token", "per_request", "output_tokens")

    def __init__(self) -> None:
        self.per_token = _Moving()
        self.per_request = _Moving()
        self.output_tokens = _Moving()


class CostModel:
    def __init__(self, prior_grams_per_token: float = PRIOR_GRAMS_PER_TOKEN) -> None:
        self._prior_per_token = prior_grams_per_token
        self._models: dict[str, _ModelCost] = {}

    def predict_grams(self, model: str | None, prompt_tokens: int, max_output_tokens: int | None) -> float:
        cost = self._models.get(self._key(model, create=False))
        if prompt_tokens <= 0 and max_output_tokens is None:
            if cost is not None and cost.per_request.seen:
                return cost.per_request.upper()
            return PRIOR_GRAMS_PER_REQUEST
        if max_output_tokens is None:
            seen = cost is not None and cost.output_tokens.seen
            max_output_tokens = round(cost.output_tokens.upper()) if seen else DEFAULT_OUTPUT_TOKENS  # type: ignore[union-attr]
        if cost is not None and cost.per_token.seen:
            per_token = cost.per_token.upper()
        else:
            per_token = self.prior_grams_per_token()
        return (prompt_tokens + max_output_tokens) * per_token

    def prior_grams_per_token(self) -> float:
        """For a model with no receipt yet: the dearest learned figure, else the prior."""
        learned = [c.per_token.upper() for c in self._models.values() if c.per_token.seen]
        return max(learned) if learned else self._prior_per_token

    def learn(self, receipt: Receipt) -> None:
        """Called with each final receipt."""
        if receipt.status != "final" or receipt.co2e_grams < 0 or receipt.outcome != "ok":
            return
        key = self._key(receipt.model, create=True)
        cost = self._models.get(key)
        if cost is None:
            cost = self._models[key] = _ModelCost()
        cost.per_request.add(receipt.co2e_grams)
        tokens = (receipt.prompt_tokens or 0) + (receipt.output_tokens or 0)
        if tokens > 0:
            cost.per_token.add(receipt.co2e_grams / tokens)
        if receipt.output_tokens is not None:
            cost.output_tokens.add(float(receipt.output_tokens))

    def _key(self, model: str | None, create: bool) -> str:
        name = model or ""
        if name in self._models or (create and len(self._models) < MAX_MODELS):
            return name
        return OTHER_MODELS  # beyond the cap, unknown names share one entry


def requested_output_tokens(body: bytes | None, parsed: dict[str, Any] | None = None) -> int | None:
    """The output limit a request body names (max_tokens and its dialect cousins).
    `parsed`: the body already parsed by the caller (routing), so it is not parsed twice."""
    data = parsed if parsed is not None else (parse_json_object(body) if body else None)
    if data is None:
        return None
    for name in _TOP_LEVEL_LIMITS:
        value = _count(data.get(name))
        if value is not None:
            return value
    for nested, name in (("parameters", "max_new_tokens"), ("options", "num_predict")):
        inner = data.get(nested)
        if isinstance(inner, dict):
            value = _count(inner.get(name))
            if value is not None:
                return value
    return None


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return min(value, 1_000_000)
