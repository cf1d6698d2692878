"""What the router reads from a request body: a prompt-size estimate and the output limit.

Only for ranking upstreams (every candidate sees the same numbers), so a rough estimate
is enough: about 4 characters per token, the usual rule of thumb for English BPE
vocabularies. The receipts keep the server's exact counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

CHARS_PER_TOKEN = 4.0
MAX_TOKENS_FIELDS = ("max_completion_tokens", "max_tokens", "max_new_tokens", "num_predict", "n_predict")


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str | None
    prompt_tokens: int
    max_tokens: int | None


def _text_chars(value: Any, depth: int = 0) -> int:
    if depth > 6:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(_text_chars(value.get(k), depth + 1) for k in ("content", "text", "prompt", "input", "inputs", "messages"))
    return 0


def read_request(body: Mapping[str, Any] | None, model: str | None) -> RouteRequest:
    if not body:
        return RouteRequest(model, 0, None)
    chars = _text_chars(body)
    max_tokens = None
    for name in MAX_TOKENS_FIELDS:
        sources = (body, body.get("parameters"), body.get("options"))
        for source in sources:
            value = source.get(name) if isinstance(source, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                max_tokens = value
                break
        if max_tokens is not None:
            break
    return RouteRequest(model, round(chars / CHARS_PER_TOKEN), max_tokens)
