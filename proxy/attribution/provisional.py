"""The figure at the end of the response (DESIGN.md section 5, the first channel).

When a request closes, the meter has not yet covered its end, and the requests it
shared intervals with may still be running. Its figure then is what is settled so far,
estimates for the intervals not settled yet, and a prediction for the tail since the
last meter reading: the group's current power (smoothed), less idle, shared by the
learned cost function among the work done in the tail, plus the static share. Headers
and end-of-stream emissions carry it, `status=provisional`; the settled figure replaces
it once every interval is metered and every member reported its work (engine.py).
"""

from __future__ import annotations

from array import array
from collections import deque
from typing import Callable

from proxy.attribution.costmodel import Rates
from proxy.attribution.group import Group, Interval
from proxy.attribution.prefill import ProgressSpan
from proxy.attribution.split import context_tokens, known_work, presence_shares
from proxy.attribution.usage import RequestUsage

RECENT_SECONDS = 0.3
"""The current power is the mean over the latest intervals covering this long: one
interval alone may be a stale read (0 W, then twice the power)."""

Split = Callable[[Group, Interval, bool], tuple[list[float], float, Rates]]
"""The engine's split of one interval's dynamic joules among its members (settle=False)."""


def recent_watts(recent: deque[tuple[float, float]], fallback_watts: float) -> float:
    """The group's current power from its latest (seconds, joules) intervals."""
    seconds = joules = 0.0
    for duration, energy in reversed(recent):
        seconds += duration
        joules += energy
        if seconds >= RECENT_SECONDS:
            break
    return joules / seconds if seconds > 0 else fallback_watts


def _prompt(usage: RequestUsage) -> float:
    return usage.prompt_tokens if usage.prompt_tokens is not None else usage.prompt_tokens_estimate


class EndOfResponse:
    """Estimates for unsettled intervals and the predicted tail, per request."""

    def __init__(self, split: Split, weight_at: Callable[[float], float]) -> None:
        self._split = split
        self._weight_at = weight_at

    def figure(self, group: Group, usage: RequestUsage, now: float) -> tuple[float, float, float]:
        """(joules, weighted joules, reserved seconds) for a request that just closed:
        credited shares, estimates for the intervals not settled yet, and the tail since
        the last sample predicted: the group's recent dynamic power shared by the learned
        cost function among the work done in the tail, plus its static share."""
        joules = usage.energy_joules
        weighted = usage.weighted_joules + usage.weighted_estimate
        reserved = usage.reserved_seconds
        if group.last_t is None:
            return joules, weighted, reserved
        t0 = group.last_t
        end = usage.closed_at if usage.closed_at is not None else now
        if end <= max(t0, usage.opened_at):
            return joules, weighted, reserved
        members = [u for u in group.open if u.opened_at < end] + [
            u for u in group.closed_since_sample if u.closed_at > t0  # type: ignore[operator]
        ]
        if usage not in members:
            members.append(usage)
        spans = [(u.opened_at, u.closed_at if u.closed_at is not None else end) for u in members]
        presence, _ = presence_shares(spans, t0, end)
        i = members.index(usage)
        duration = end - t0
        idle_watts = group.idle.watts(fallback_watts=group.last_power_watts) if group.idle.current_watts() is None else group.idle.current_watts() or 0.0
        current_watts = recent_watts(group.recent, group.last_power_watts)
        static = min(idle_watts, current_watts) * presence[i]
        prefill = group.prefill
        tail = Interval(
            t0=t0,
            t1=end,
            dynamic_joules=max(0.0, current_watts - idle_watts) * duration,
            weight=0.0,
            members=members,
            presence=array("d", presence),
            binned=array("d", (u.unsampled_output_tokens for u in members)),
            estimates=array("d", bytes(8 * len(members))),
            contexts=array("d", (_prompt(u) + u.sampled_output_tokens for u in members)),
            progress=ProgressSpan(t0, end, prefill.progress_at_sample, prefill.progress_tokens),
        )
        shares, _, _ = self._split(group, tail, False)
        tail_joules = static + shares[i]
        joules += tail_joules
        weighted += tail_joules * self._weight_at(end)
        reserved += presence[i]
        return joules, weighted, reserved

    def estimate(self, group: Group, interval: Interval) -> None:
        """Credit a new unsettled interval's shares as estimates, from the work known now."""
        shares, _, _ = self._split(group, interval, False)
        for i, (usage, share) in enumerate(zip(interval.members, shares)):
            interval.estimates[i] = share
            usage.dynamic_joules_estimate += share
            usage.weighted_estimate += share * interval.weight

    def reestimate(self, group: Group, interval: Interval, usage: RequestUsage) -> None:
        """A non-streamed request closed: its work in an unsettled interval is known now
        (it was not while it ran). Re-price its own share against the interval's totals;
        O(1), the other members keep their estimates until the interval settles."""
        try:
            i = interval.members.index(usage)
        except ValueError:
            return
        pace = group.pace.pace()
        prompt, _, decoding = known_work(usage, interval.t0, interval.t1, 0.0, pace, (interval.progress.start, interval.progress.end))
        prices = interval.prices
        old_prompt, old_decode = interval.priced_prompt[i], interval.priced_decode[i]
        if prices is None:
            new_prompt = group.prefill_weight * prompt
            new_decode = decoding * interval.tokens_per_batch_second
        else:
            start = usage.prefill_done_at if usage.prefill_done_at is not None else usage.opened_at
            context = context_tokens(usage, start, usage.closed_at or interval.t1, (interval.t0 + interval.t1) / 2)
            output = decoding * interval.tokens_per_batch_second
            new_prompt = prices.joules(prompt, 0.0, 0.0, 0.0)
            new_decode = prices.joules(0.0, output, output * context, decoding)
        prompts = sum(interval.priced_prompt) - old_prompt + new_prompt
        decodes = sum(interval.priced_decode) - old_decode + new_decode
        dynamic = interval.dynamic_joules
        if prices is None or prompts <= 0 or decodes <= 0:
            total = prompts + decodes
            share = dynamic * (new_prompt + new_decode) / total if total > 0 else 0.0
        else:
            scale = min(1.0, dynamic / prompts)
            share = new_prompt * scale + new_decode * (dynamic - prompts * scale) / decodes
        interval.priced_prompt[i], interval.priced_decode[i] = new_prompt, new_decode
        delta = share - interval.estimates[i]
        interval.estimates[i] = share
        usage.dynamic_joules_estimate += delta
        usage.weighted_estimate += delta * interval.weight
