"""Where a device group processed prompt tokens, inferred from the meter.

A non-streamed request shows only its start and end, yet its prefill is most of its
energy when prompts are long, and it can wait in a queue for seconds first. Servers
prefill prompts first come, first served (vLLM, TGI, llama.cpp all schedule FCFS), so
the group's prefill *progress* (prompt tokens processed so far) tells where each
request's prefill was: while progress passes through the request's slice of the
cumulative arrived prompt tokens.

Progress is measured, not assumed: each interval adds its dynamic energy less what the
decoding batch drew, over the learned joules per prompt token (until those are learned,
it advances at the learned prefill pace). It never passes what has arrived. When a
request shows that its prefill is done (a stream's first token; a request's end, less
its decoding) and progress has not got there, progress was behind: the missing tokens
are spread back over the intervals since the oldest waiting prompt arrived (still
unsettled, as that request is in all of them), where the energy that processed them was
drawn, instead of all landing at the moment we found out. Cost: O(1) per request and per
interval, plus the intervals a correction spreads over.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from proxy.attribution.usage import RequestUsage

HISTORY_SPANS = 600
"""Intervals a correction may reach back over (a minute at 10 Hz)."""


@dataclass(slots=True, eq=False)
class ProgressSpan:
    """The group's prefill progress (cumulative prompt tokens) over one interval."""

    t0: float
    t1: float
    start: float
    end: float


class PrefillProgress:
    def __init__(self) -> None:
        self.arrived_tokens = 0.0
        self.progress_tokens = 0.0
        """Now, corrections since the last sample included."""
        self.progress_at_sample = 0.0
        self.last_sample_t: float | None = None
        self._waiting: deque[RequestUsage] = deque()  # prefill not done, in arrival order
        self._last: RequestUsage | None = None
        self._history: deque[ProgressSpan] = deque(maxlen=HISTORY_SPANS)

    def enqueue(self, usage: RequestUsage) -> None:
        """A request arrived: its prompt joins the back of the queue."""
        last = self._last
        if last is not None and not last.final:
            usage.queued_after = last
        self._last = usage
        usage.queue_from_tokens = self.arrived_tokens
        self.arrived_tokens += max(0, usage.prompt_tokens_estimate)
        usage.queue_to_tokens = self.arrived_tokens
        if usage.queue_to_tokens <= self.progress_tokens:
            usage.prefill_done_at = usage.opened_at  # nothing to prefill that we know of
        else:
            self._waiting.append(usage)

    def waiting(self) -> list[RequestUsage]:
        """Requests whose prefill is not known to be done, in arrival order."""
        return [u for u in self._waiting if u.prefill_done_at is None]

    def done_by(self, usage: RequestUsage, at: float) -> None:
        """The request's prefill had finished by `at`; so had every prefill queued before it."""
        if usage.prefill_done_at is not None:
            return
        behind = usage.queue_to_tokens - self.progress_tokens
        if behind > 0:
            self._catch_up(behind, at)
        self._pop_done(at)
        usage.prefill_done_at = at

    def advance(self, t0: float, t1: float, processed_tokens: float) -> ProgressSpan:
        """The interval [t0, t1] processed this many prompt tokens (measured)."""
        start = self.progress_at_sample
        # A correction is a fact; what has arrived caps only the measured part.
        end = max(self.progress_tokens, min(self.arrived_tokens, start + max(0.0, processed_tokens)))
        span = ProgressSpan(t0, t1, start, end)
        self._history.append(span)
        self.progress_tokens = self.progress_at_sample = end
        self.last_sample_t = t1
        self._pop_done(t1)
        if not self._waiting:
            self._history.clear()  # the next correction starts after the next arrival
        return span

    def _catch_up(self, tokens: float, at: float) -> None:
        """Progress was `tokens` behind at `at`: spread them, growing linearly, from when
        the oldest waiting prompt arrived."""
        head = next((u for u in self._waiting if u.prefill_done_at is None), None)
        since = min(head.opened_at if head is not None else at, at)

        def added(t: float) -> float:
            if at <= since:
                return tokens if t >= at else 0.0
            return tokens * min(1.0, max(0.0, (t - since) / (at - since)))

        for span in self._history:
            if span.t1 > since:
                span.start += added(span.t0)
                span.end += added(span.t1)
        if self.last_sample_t is not None:
            self.progress_at_sample += added(self.last_sample_t)
        self.progress_tokens += tokens

    def _pop_done(self, now: float) -> None:
        waiting = self._waiting
        while waiting and (waiting[0].queue_to_tokens <= self.progress_tokens or waiting[0].prefill_done_at is not None):
            head = waiting.popleft()
            if head.prefill_done_at is None:
                head.prefill_done_at = max(head.opened_at, self._time_at(head.queue_to_tokens, now))

    def _time_at(self, tokens: float, now: float) -> float:
        """When progress reached `tokens`: within the interval that holds it, evenly."""
        for span in reversed(self._history):
            if span.start < tokens <= span.end:
                return span.t0 + (span.t1 - span.t0) * (tokens - span.start) / (span.end - span.start)
            if span.end < tokens:
                break
        last = self.last_sample_t
        if last is not None and self.progress_tokens > self.progress_at_sample and tokens > self.progress_at_sample:
            fraction = (tokens - self.progress_at_sample) / (self.progress_tokens - self.progress_at_sample)
            return last + (now - last) * min(1.0, fraction) if now > last else now
        return now


def queued_prompt_in(usage: RequestUsage, progress_from: float, progress_to: float, prompt_tokens: float) -> float:
    """The request's prompt tokens processed while progress went from `progress_from` to
    `progress_to` (its slice of the queue, scaled to the exact count once known)."""
    low, high = usage.queue_from_tokens, usage.queue_to_tokens
    if high <= low:
        return 0.0
    overlap = min(high, progress_to) - max(low, progress_from)
    return prompt_tokens * overlap / (high - low) if overlap > 0 else 0.0
