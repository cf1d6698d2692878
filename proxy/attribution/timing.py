"""When a request's work happened, learned from what crosses the wire.

A streamed request shows when its prefill ended (first token) and when each output token
left; a non-streamed one only shows its start, its end and its totals. To place the
latter's work in time, and a stream's prefill inside its time to first token (which also
holds the time it queued), the engine learns two paces from streams:
- prefill throughput, prompt tokens per second: a high percentile of prompt tokens over
  time to first token, because the fastest first tokens are the ones that did not queue;
- decode time per output token: the median (and a low percentile) of streams' mean gap
  between tokens.
Until enough streams were seen, the configured defaults stand in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

PREFILL_PERCENTILE = 0.9
FAST_DECODE_PERCENTILE = 0.1
MIN_STREAMS = 20


@dataclass(frozen=True, slots=True)
class Pace:
    prefill_tokens_per_second: float
    decode_seconds_per_token: float | None
    """Typical (median) time per output token of a decoding sequence; None while unknown."""
    fastest_decode_seconds_per_token: float | None
    """A low percentile of the same: a request with n output tokens decoded for at least
    about n times this before its end."""


class PaceLearner:
    def __init__(self, default_prefill_tokens_per_second: float, window: int = 256) -> None:
        self._default_prefill = default_prefill_tokens_per_second
        self._prefill_rates = deque[float](maxlen=window)
        self._token_gaps = deque[float](maxlen=window)
        self._cached: Pace | None = None

    def observe_stream(
        self, prompt_tokens: int, opened_at: float, first_token_at: float, last_token_at: float, output_tokens: int
    ) -> None:
        """A finished stream: prompt and output totals and its token times."""
        to_first = first_token_at - opened_at
        if prompt_tokens > 0 and to_first > 0:
            self._prefill_rates.append(prompt_tokens / to_first)
            self._cached = None
        if output_tokens > 1 and last_token_at > first_token_at:
            self._token_gaps.append((last_token_at - first_token_at) / (output_tokens - 1))
            self._cached = None

    def state(self) -> dict[str, list[float]]:
        return {"prefill_rates": list(self._prefill_rates), "token_gaps": list(self._token_gaps)}

    def load(self, state: dict[str, list[float]]) -> None:
        self._prefill_rates.extend(float(v) for v in state.get("prefill_rates", []) if v > 0)
        self._token_gaps.extend(float(v) for v in state.get("token_gaps", []) if v > 0)
        self._cached = None

    def pace(self) -> Pace:
        if self._cached is None:
            prefill = self._default_prefill
            if len(self._prefill_rates) >= MIN_STREAMS:
                ordered = sorted(self._prefill_rates)
                prefill = ordered[int(PREFILL_PERCENTILE * (len(ordered) - 1))]
            gap = fastest = None
            if len(self._token_gaps) >= MIN_STREAMS:
                ordered = sorted(self._token_gaps)
                gap = ordered[len(ordered) // 2]
                fastest = ordered[int(FAST_DECODE_PERCENTILE * (len(ordered) - 1))]
            self._cached = Pace(prefill, gap, fastest)
        return self._cached
