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
from proxy.attribution.group import DEFAULT_DECODE_SECONDS_PER_TOKEN, Group, Interval
from proxy.attribution.ledger import Ledger, Row
from proxy.attribution.prefill import ProgressSpan
from proxy.attribution.split import context_tokens, known_work, presence_shares
from proxy.attribution.timing import Pace
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
        pace = group.pace.pace()
        rows = [self._row(interval, i, u, pace, w) for i, (u, w) in enumerate(zip(interval.members, interval.works))]
        blind = any(not u.streaming and w[3] > 0 for u, w in zip(interval.members, interval.works))
        fallback = 1.0 / (pace.decode_seconds_per_token or DEFAULT_DECODE_SECONDS_PER_TOKEN)
        ledger = Ledger(rows, blind, fallback)
        ledger.priced_with = group.model.fit if interval.prices is not None else None
        interval.ledger = ledger
        for usage in interval.members:
            first = usage.first_token_at
            if first is not None and interval.t0 < first <= interval.t1:
                # Its first token placed its prompt (before it, at the prefill pace):
                # where it waited, the intervals' totals held it where the queue said.
                for earlier in usage.pending:
                    self._revise(group, earlier, usage)  # type: ignore[arg-type]
        for i, (usage, share) in enumerate(zip(interval.members, shares)):
            interval.estimates[i] = share
            usage.dynamic_joules_estimate += share
            usage.weighted_estimate += share * interval.weight

    def reprice(self, group: Group, interval: Interval, usage: RequestUsage) -> None:
        """A request closed: its work in an unsettled interval is known now (a
        non-streamed one's output was not while it ran; a stream's tokens per chunk
        were not), and the cost model may have learned since the interval was first
        split. Re-price its share at the current model against the interval's work as
        known now (the ledger); O(1) plus one price evaluation: the other members keep
        their estimates until they close or the interval settles."""
        i = self._revise(group, interval, usage)
        if i is None:
            return
        share = self._share(group, interval, i)
        delta = share - interval.estimates[i]
        interval.estimates[i] = share
        usage.dynamic_joules_estimate += delta
        usage.weighted_estimate += delta * interval.weight

    def _revise(self, group: Group, interval: Interval, usage: RequestUsage) -> int | None:
        """Replace the member's work in the interval's ledger by what is known of it now;
        returns its index (None if it is no member)."""
        ledger = interval.ledger
        if ledger is None:
            return None
        try:
            i = interval.members.index(usage)
        except ValueError:
            return None
        ledger.replace(i, self._row(interval, i, usage, group.pace.pace(), None))
        return i

    @staticmethod
    def _row(
        interval: Interval, i: int, usage: RequestUsage, pace: Pace, split: tuple[float, float, float, float] | None
    ) -> Row:
        """Member i's ledger row (ledger.Row). `split`: its work as the split just counted
        it (an open request's is as known; else it is worked out again)."""
        if split is not None and usage.closed_at is None:
            prompt, raw, decoding = split[0], (interval.binned[i] if usage.streaming else 0.0), split[3]
            if decoding <= 0:
                raw = split[1]
        else:
            progress = (interval.progress.start, interval.progress.end)
            prompt, raw, decoding = known_work(usage, interval.t0, interval.t1, interval.binned[i], pace, progress)
        seen = usage.streaming or usage.closed_at is not None
        if decoding <= 0:
            return (prompt, raw, 0.0, 0.0, seen)
        if usage.streaming:
            context = interval.contexts[i]
        else:
            start = usage.prefill_done_at if usage.prefill_done_at is not None else usage.opened_at
            end = usage.closed_at if usage.closed_at is not None else interval.t1
            context = context_tokens(usage, start, end, (interval.t0 + interval.t1) / 2)
        return (prompt, raw, context, decoding, seen)

    @staticmethod
    def _share(group: Group, interval: Interval, i: int) -> float:
        """Member i's dynamic joules in the interval (split.split_priced, or split_dynamic
        before the cost model is learned), from the ledger alone."""
        ledger = interval.ledger
        assert ledger is not None
        dynamic = interval.dynamic_joules
        prompt_tokens, output, context, decoding = ledger.work(i)
        totals = ledger.totals()
        model = group.model
        if interval.prices is None or model.fit is None:
            total = group.prefill_weight * totals[0] + totals[1]
            mine = group.prefill_weight * prompt_tokens + output
            return dynamic * mine / total if total > 0 else 0.0
        if ledger.priced_with is not model.fit or ledger.moved(totals):
            # Learned since, or the work moved: the prices at the interval's rates now.
            duration = interval.t1 - interval.t0
            rates = Rates(*(total / duration for total in totals))
            interval.prices = group.prices_over(interval.t0, interval.t1, rates)
            ledger.priced_with = model.fit
            ledger.priced_at = totals
        prices = interval.prices
        prompts = prices.prompt * totals[0]
        decodes = prices.joules(0.0, totals[1], totals[2], totals[3])
        mine_prompt = prices.prompt * prompt_tokens
        mine_decode = prices.joules(0.0, output, context, decoding)
        if mine_decode <= 0 < output and totals[1] > 0:
            mine_decode = output * decodes / totals[1]  # work no learned term prices (engine._priced)
        if prompts <= 0 or decodes <= 0:
            total = prompts + decodes
            return dynamic * (mine_prompt + mine_decode) / total if total > 0 else 0.0
        scale = min(1.0, dynamic / prompts)
        return mine_prompt * scale + mine_decode * (dynamic - prompts * scale) / decodes
