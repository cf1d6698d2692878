"""One request as attribution sees it: when it was present and what work it did when."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(slots=True, eq=False)
class RequestUsage:
    """Filled by the request side (opened, ticks, close); credited by the engine.

    Times are time.monotonic() seconds. Work is in tokens (or diffusion work units);
    the engine weighs prompt tokens by the prefill weight when it splits.
    """

    group: str
    opened_at: float
    streaming: bool
    prompt_tokens_estimate: int = 0
    closed_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None

    # Output tokens seen since the last meter sample (streams): the engine bins them.
    unsampled_output_tokens: int = 0
    sampled_output_tokens: int = 0
    tick_times: list[float] = field(default_factory=list, repr=False)
    """When those unsampled tokens passed: the server's step ends (steps.py)."""

    # Exact totals, known at close.
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    work_units: float | None = None
    prefill_seconds: float | None = None

    # The request's slice of its group's cumulative arrived prompt tokens, and when the
    # group's prefill progress passed its end (see prefill.py).
    queue_from_tokens: float = 0.0
    queue_to_tokens: float = 0.0
    prefill_done_at: float | None = None
    token_ends: Sequence[float] | None = field(default=None, repr=False)
    """A non-streamed request's output token times, once the steps streams showed place
    them (steps.py StepEnds.token_ends): one token per step, the last at its end."""

    queued_after: "RequestUsage | None" = field(default=None, repr=False)
    """The request queued just before it (prefill is first come, first served: its
    prefill began once that one's had ended); dropped once final."""
    prompt_debt_joules: float = 0.0
    """Prompt joules at its price that a settled interval could not pay (it drew less
    than its prompts' price: the energy was stamped in a neighbouring interval)."""

    # What the engine credited. Static shares are final when credited; dynamic shares
    # are estimates until every request in the interval is closed.
    static_joules: float = 0.0
    dynamic_joules_final: float = 0.0
    dynamic_joules_estimate: float = 0.0
    reserved_seconds: float = 0.0
    """Seconds of the device group this request held, shared with those present (for embodied carbon)."""
    weighted_joules: float = 0.0
    """Sum of credited joules x weight(time of interval); the caller's price, e.g. gCO2e/kWh."""
    weighted_estimate: float = 0.0
    pending_intervals: int = 0
    pending: list[object] = field(default_factory=list, repr=False)
    """The engine's unsettled intervals this request is in (settled once all are covered)."""
    final: bool = False
    owner: object | None = field(default=None, repr=False)
    """The caller's record for this request (the engine never looks inside)."""

    def tick(self, count: int, at: float) -> None:
        """Output tokens seen in the stream (hot path: an add and a store)."""
        if self.first_token_at is None:
            self.first_token_at = at
        self.last_token_at = at
        self.unsampled_output_tokens += count
        self.tick_times.append(at)

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    @property
    def energy_joules(self) -> float:
        """Best figure now: final shares plus estimates for intervals not yet settled."""
        return self.static_joules + self.dynamic_joules_final + self.dynamic_joules_estimate

    def prefill_ended_at(self) -> float | None:
        """When its prefill ended, where the steps show it: a stream's first token, the
        first of a non-streamed request's placed tokens (None while not known)."""
        if self.first_token_at is not None:
            return self.first_token_at
        return self.token_ends[0] if self.token_ends is not None else None

    def presence_seconds(self, t0: float, t1: float) -> float:
        end = self.closed_at if self.closed_at is not None else t1
        return max(0.0, min(end, t1) - max(self.opened_at, t0))
