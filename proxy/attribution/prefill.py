"""Where a device group processed prompt tokens, inferred from the meter.

A non-streamed request shows only its start and end, yet its prefill is most of its
energy when prompts are long, and it can wait in a queue for seconds first. Servers
prefill prompts first come, first served (vLLM, TGI, llama.cpp schedule FCFS), so the
group's prefill *progress* (prompt tokens processed so far) tells where each request's
prefill was: while progress passes through the request's slice of the cumulative
arrived prompt tokens.

Progress is measured, not assumed: each interval adds its dynamic energy less what the
decoding batch drew, over the learned joules per prompt token (until those are learned,
it advances at the learned prefill pace). It never passes what has arrived, and it jumps
forward when a request shows that its prefill is done: a stream's first token, or any
request's end. Cost: O(1) per request and per interval, plus the requests it passes.
"""

from __future__ import annotations

from collections import deque

from proxy.attribution.usage import RequestUsage


class PrefillProgress:
    def __init__(self) -> None:
        self.arrived_tokens = 0.0
        self.progress_tokens = 0.0
        """Now, jumps included."""
        self.progress_at_sample = 0.0
        self._waiting: deque[RequestUsage] = deque()  # prefill not done, in arrival order

    def enqueue(self, usage: RequestUsage) -> None:
        """A request arrived: its prompt joins the back of the queue."""
        usage.queue_from_tokens = self.arrived_tokens
        self.arrived_tokens += max(0, usage.prompt_tokens_estimate)
        usage.queue_to_tokens = self.arrived_tokens
        if usage.queue_to_tokens <= self.progress_tokens:
            usage.prefill_done_at = usage.opened_at  # nothing to prefill that we know of
        else:
            self._waiting.append(usage)

    def done_by(self, usage: RequestUsage, at: float) -> None:
        """The request's prefill has finished by `at` (first token, or its end); so has
        every prefill queued before it."""
        if usage.prefill_done_at is not None:
            return
        self.progress_tokens = max(self.progress_tokens, usage.queue_to_tokens)
        waiting = self._waiting
        while waiting and (waiting[0].queue_to_tokens <= self.progress_tokens or waiting[0].prefill_done_at is not None):
            head = waiting.popleft()
            if head.prefill_done_at is None:
                head.prefill_done_at = max(head.opened_at, at)
        usage.prefill_done_at = at

    def first_tokens(self) -> list[RequestUsage]:
        """Queued streams that showed their first token since the last sample."""
        return [u for u in self._waiting if u.first_token_at is not None and u.prefill_done_at is None]

    def advance(self, t0: float, t1: float, processed_tokens: float) -> tuple[float, float]:
        """The interval [t0, t1] processed this many prompt tokens (measured). Returns
        the progress at t0 and at t1, jumps within the interval included."""
        start = self.progress_at_sample
        # A jump is a fact; what has arrived caps only the measured part.
        end = max(self.progress_tokens, min(self.arrived_tokens, start + max(0.0, processed_tokens)))
        waiting = self._waiting
        span = end - start
        while waiting and (waiting[0].queue_to_tokens <= end or waiting[0].prefill_done_at is not None):
            head = waiting.popleft()
            if head.prefill_done_at is None:
                # Progress is even within the interval: when it passed the end of the slice.
                fraction = (head.queue_to_tokens - start) / span if span > 0 else 1.0
                head.prefill_done_at = max(head.opened_at, t0 + (t1 - t0) * min(1.0, max(0.0, fraction)))
        self.progress_tokens = self.progress_at_sample = end
        return start, end


def queued_prompt_in(usage: RequestUsage, progress_from: float, progress_to: float, prompt_tokens: float) -> float:
    """The request's prompt tokens processed while progress went from `progress_from` to
    `progress_to` (its slice of the queue, scaled to the exact count once known)."""
    low, high = usage.queue_from_tokens, usage.queue_to_tokens
    if high <= low:
        return 0.0
    overlap = min(high, progress_to) - max(low, progress_from)
    return prompt_tokens * overlap / (high - low) if overlap > 0 else 0.0
