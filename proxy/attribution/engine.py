"""The attribution engine: meter samples in, per-request joules out.

Each meter sample closes an interval per device group. Static shares are final at
once (presence is known); dynamic shares are estimates until every request present in
the interval has closed and reported its exact work, then the interval settles and the
estimates are replaced. Every interval's energy goes either to requests or to idle, so
request energy + idle energy = measured energy.

Dynamic energy follows work (DESIGN.md section 5). What the proxy sees of work is
indirect, so per group it learns: idle power; the cost of work (learning.py: joules per
prompt token, and decode power by batch size); when prompts were processed (prefill.py
and placement.py: from the meter and the steps, first come first served); and paces from
streams (timing.py). What each group keeps, and its learned state, is in group.py.
"""

from __future__ import annotations

import logging
import math
from array import array
from typing import Any, Callable, Iterable, Mapping, Sequence

from proxy.attribution.costmodel import CostModel, Rates
from proxy.attribution.group import DEFAULT_DECODE_SECONDS_PER_TOKEN, DEFAULT_PREFILL_WEIGHT, GroupTotals
from proxy.attribution.group import Group as _Group
from proxy.attribution.group import Interval as _Interval
from proxy.attribution.learning import IdlePowerLearner
from proxy.attribution.placement import advance_progress, prefill_done_before_end, prefill_steps_from
from proxy.attribution.prior import GroupPrior
from proxy.attribution.provisional import EndOfResponse
from proxy.attribution.split import context_tokens, decode_work, known_work, presence_shares
from proxy.attribution.split import split_dynamic, split_priced, unpaid_prompts
from proxy.attribution.usage import RequestUsage
from proxy.meters.base import EnergySample

log = logging.getLogger("carbon_proxy.attribution")



class AttributionEngine:
    def __init__(
        self,
        groups: Mapping[str, Sequence[str]],
        *,
        idle_power_watts: float | Mapping[str, float] | None = None,
        prefill_weight: float | None = None,
        weight_at: Callable[[float], float] | None = None,
        on_final: Callable[[RequestUsage], None] | None = None,
        prior: Mapping[str, GroupPrior] | None = None,
    ) -> None:
        """groups: group name -> meter device ids (an upstream's `devices`).
        idle_power_watts: per device (a number, or per device id), or None to learn it.
        prefill_weight: a fixed prefill weight, or None to learn each group's costs.
        weight_at: a price per joule at a monotonic time (e.g. grid intensity), summed
        alongside joules so that each interval is priced at its own time.
        prior: per group, what the device says before anything is learned (prior.py)."""
        self._groups: dict[str, _Group] = {}
        for name, devices in groups.items():
            fixed = None
            if isinstance(idle_power_watts, (int, float)):
                fixed = float(idle_power_watts) * len(devices)
            elif isinstance(idle_power_watts, Mapping):
                fixed = sum(float(idle_power_watts.get(d, 0.0)) for d in devices)
            group_prior = (prior or {}).get(name)
            idle = IdlePowerLearner(fixed_watts=fixed, prior_watts=group_prior.idle_watts if group_prior else None)
            model = CostModel()
            if group_prior is not None and group_prior.board_watts is not None and group_prior.idle_watts is not None:
                model.peak_watts = max(0.0, group_prior.board_watts - group_prior.idle_watts)
            group = _Group(name, tuple(devices), idle, model, prefill_weight)
            if prefill_weight is not None:
                group.prefill_weight = prefill_weight
            self._groups[name] = group
        self._weight_at = weight_at or (lambda t: 0.0)
        self._on_final = on_final
        self._end = EndOfResponse(self._split, self._weight_at)

    # -- request side ---------------------------------------------------------------

    @property
    def group_names(self) -> Iterable[str]:
        return self._groups.keys()

    def open(self, group: str, at: float, *, streaming: bool, prompt_tokens_estimate: int = 0) -> RequestUsage:
        usage = RequestUsage(group=group, opened_at=at, streaming=streaming, prompt_tokens_estimate=prompt_tokens_estimate)
        g = self._groups[group]
        g.open[usage] = None
        g.prefill.enqueue(usage)
        return usage

    def close(
        self,
        usage: RequestUsage,
        at: float,
        *,
        prompt_tokens: int | None,
        output_tokens: int | None,
        work_units: float | None = None,
        prefill_seconds: float | None = None,
    ) -> None:
        if usage.closed:
            return
        usage.closed_at = max(at, usage.opened_at)
        usage.prompt_tokens = prompt_tokens
        usage.output_tokens = output_tokens
        usage.work_units = work_units
        usage.prefill_seconds = prefill_seconds
        group = self._groups[usage.group]
        if usage.streaming and usage.first_token_at is not None and usage.last_token_at is not None:
            group.pace.observe_stream(
                prompt_tokens or 0, usage.opened_at, usage.first_token_at, usage.last_token_at, output_tokens or 0
            )
        group.open.pop(usage, None)
        group.closed_since_sample.append(usage)
        if not usage.streaming and usage.prefill_done_at is None:
            # Said now, not at the next sample: where progress was behind, its prompt
            # moves into the intervals it was processed in before its end-of-response
            # figure is read (else that figure missed the part progress had not reached).
            group.prefill.done_by(usage, prefill_done_before_end(group, usage))
        for interval in usage.pending:
            assert isinstance(interval, _Interval)
            self._end.reprice(group, interval, usage)

    def provisional(self, usage: RequestUsage, now: float) -> tuple[float, float, float]:
        """(joules, weighted joules, reserved seconds) for a request that just closed,
        before the meter has covered its end (provisional.py)."""
        return self._end.figure(self._groups[usage.group], usage, now)

    @staticmethod
    def _prompt(usage: RequestUsage) -> float:
        return usage.prompt_tokens if usage.prompt_tokens is not None else usage.prompt_tokens_estimate

    # -- meter side -----------------------------------------------------------------

    def on_sample(self, sample: EnergySample) -> None:
        for group in self._groups.values():
            try:
                joules = sum(sample.joules_by_device[d] for d in group.devices)
            except KeyError:
                continue  # the meter lost a device this round; the next sample covers it
            self._advance(group, sample.timestamp_seconds, joules)

    def _advance(self, group: _Group, t1: float, joules: float) -> None:
        if group.last_t is None:
            group.last_t, group.last_joules = t1, joules
            return
        t0 = group.last_t
        duration = t1 - t0
        if duration <= 0:
            return
        energy = max(0.0, joules - group.last_joules)
        group.last_t, group.last_joules = t1, joules
        group.last_power_watts = energy / duration
        group.recent.append((duration, energy))
        group.totals.measured_joules += energy
        weight = self._weight_at((t0 + t1) / 2)

        members = [u for u in group.open if u.opened_at < t1]
        members += [u for u in group.closed_since_sample if u.closed_at > t0 and u.opened_at < t1]  # type: ignore[operator]
        if not members:
            group.idle.observe(energy, duration)
        else:
            group.idle.interrupt()

        idle_watts = group.idle.watts(fallback_watts=group.last_power_watts)
        static_joules = min(energy, idle_watts * duration)
        spans = [(u.opened_at, u.closed_at if u.closed_at is not None else t1) for u in members]
        shares, idle_seconds = presence_shares(spans, t0, t1)
        group.totals.idle_seconds += idle_seconds
        idle_joules = static_joules * idle_seconds / duration
        static_per_second = static_joules / duration
        binned = array("d")
        contexts = array("d")
        ticks: list[float] = []
        for usage, share in zip(members, shares):
            if usage.tick_times:
                ticks += usage.tick_times
                usage.tick_times.clear()
            prompt = usage.prompt_tokens if usage.prompt_tokens is not None else usage.prompt_tokens_estimate
            contexts.append(prompt + usage.sampled_output_tokens)
            credit = static_per_second * share
            usage.static_joules += credit
            usage.weighted_joules += credit * weight
            usage.reserved_seconds += share
            group.totals.attributed_joules += credit
            binned.append(usage.unsampled_output_tokens)
            usage.sampled_output_tokens += usage.unsampled_output_tokens
            usage.unsampled_output_tokens = 0

        if ticks:
            previous_end = group.step_ends.last
            group.prefill_steps.observe_steps(group.step_ends.add(ticks), previous_end)
        dynamic_joules = energy - static_joules
        progress = advance_progress(group, t0, t1, members, binned, dynamic_joules)
        interval = _Interval(
            t0=t0,
            t1=t1,
            dynamic_joules=dynamic_joules,
            weight=weight,
            members=members,
            presence=array("d", (u.presence_seconds(t0, t1) for u in members)),
            binned=binned,
            estimates=array("d", bytes(8 * len(members))),
            contexts=contexts,
            progress=progress,
        )
        interval.uncovered = sum(1 for u in members if u.closed_at is None or u.closed_at > t1)
        if interval.uncovered == 0:
            idle_joules += self._settle(group, interval)
        else:
            self._end.estimate(group, interval)
            for usage in members:
                usage.pending_intervals += 1
                if usage.closed_at is None or usage.closed_at > t1:
                    usage.pending.append(interval)
        group.totals.idle_joules += idle_joules
        # Closed requests the meter has now covered: their intervals may settle, and
        # they become final once none is pending.
        waiting = []
        for usage in group.closed_since_sample:
            if usage.closed_at > t1:  # type: ignore[operator]
                waiting.append(usage)  # closed after the reading was taken: still uncovered
            else:
                if usage.streaming and usage.first_token_at is not None:
                    group.prefill_steps.observe_stream(self._prompt(usage), usage.opened_at, usage.first_token_at)
                self._covered(group, usage, t1)
        group.closed_since_sample = waiting

    _context = staticmethod(context_tokens)

    def _works(self, group: _Group, interval: _Interval) -> tuple[list[tuple[float, float, float, float]], Rates]:
        """Per member: (prompt tokens, output tokens, context tokens read, seconds in the
        decode batch) in the interval, from what is known now; and the interval's rates."""
        pace = group.pace.pace()
        steps_by = group.step_ends.steps_by
        prefill_from = prefill_steps_from(group, pace)
        rows: list[tuple[float, float, float]] = []
        output_total = sequence_seconds = 0.0
        for usage, binned in zip(interval.members, interval.binned):
            row = known_work(usage, interval.t0, interval.t1, binned, pace, (interval.progress.start, interval.progress.end), steps_by, prefill_from)
            rows.append(row)
            output_total += row[1]
            sequence_seconds += row[2]
        streamed = [u.streaming or u.token_ends is not None for u in interval.members]
        fallback_tokens_per_second = 1.0 / (pace.decode_seconds_per_token or DEFAULT_DECODE_SECONDS_PER_TOKEN)
        decodes = decode_work(rows, streamed, output_total, sequence_seconds, fallback_tokens_per_second)
        decoded = math.fsum(o for o, (_, _, d) in zip(decodes, rows) if d > 0)
        interval.tokens_per_batch_second = decoded / sequence_seconds if sequence_seconds > 0 and decoded > 0 else fallback_tokens_per_second
        middle = (interval.t0 + interval.t1) / 2
        works = []
        totals = [0.0, 0.0, 0.0, 0.0]
        for usage, (prompt, _, decoding), output, context in zip(interval.members, rows, decodes, interval.contexts):
            if decoding > 0 and not usage.streaming:
                start = usage.prefill_done_at if usage.prefill_done_at is not None else usage.opened_at
                end = usage.closed_at if usage.closed_at is not None else interval.t1
                context = self._context(usage, start, end, middle)
            work = (prompt, output, output * context if decoding > 0 else 0.0, decoding)
            works.append(work)
            for k in range(4):
                totals[k] += work[k]
        duration = interval.t1 - interval.t0
        return works, Rates(totals[0] / duration, totals[1] / duration, totals[2] / duration, totals[3] / duration)

    def _priced(self, group: _Group, interval: _Interval, works: list[tuple[float, float, float, float]], rates: Rates) -> tuple[list[float], list[float], bool]:
        """Each member's prompt and decode work in joules at the interval's Aumann-Shapley
        prices on the learned cost function (costmodel.py); before it is learned (or with
        a configured prefill weight), in weighted tokens to be split proportionally."""
        model = group.model
        if group.fixed_prefill_weight is not None or not model.ready:
            return [group.prefill_weight * w[0] for w in works], [w[1] for w in works], True
        prices = interval.prices = group.prices_over(interval.t0, interval.t1, rates)
        prompts = [prices.joules(prompt, 0.0, 0.0, 0.0) for prompt, _, _, _ in works]
        decodes = [prices.joules(0.0, output, context, decoding) for _, output, context, decoding in works]
        # Work that no learned term prices (an image's work units, output the model gives
        # no price): at the interval's mean price per output unit, or by units alone.
        priced_output = sum(w[1] for w, d in zip(works, decodes) if d > 0)
        per_unit = sum(decodes) / priced_output if priced_output > 0 else 1.0
        decodes = [d if d > 0 else w[1] * per_unit for w, d in zip(works, decodes)]
        return prompts, decodes, False

    def _split(self, group: _Group, interval: _Interval, settle: bool) -> tuple[list[float], float, Rates]:
        """The interval's dynamic joules per member. Prompts are paid their price and the
        decode work shares the rest (split_priced): a prompt the proxy placed in a
        neighbouring interval, or an interval whose counter read came stale, then does not
        take that interval's level."""
        works, rates = self._works(group, interval)
        prompts, decodes, proportional = self._priced(group, interval, works, rates)
        interval.works = works
        if proportional:
            weighted = [p + d for p, d in zip(prompts, decodes)]
            return (*split_dynamic(interval.dynamic_joules, weighted, interval.presence), rates)
        if settle and interval.prices is not None and rates.prompt_per_second > 0 and rates.output_per_second > 0:
            # For metrics: a prompt token's price over an output token's, all included.
            prices = interval.prices
            per_output = prices.joules(0.0, rates.output_per_second, rates.context_per_second, rates.batch) / rates.output_per_second
            if per_output > 0:
                group.prefill_weight = prices.prompt / per_output
        if settle:
            # What earlier intervals could not pay of a member's prompt is paid first.
            owed = [u.prompt_debt_joules for u in interval.members]
            if any(owed):
                prompts = [p + o for p, o in zip(prompts, owed)]
            for usage, unpaid in zip(interval.members, unpaid_prompts(interval.dynamic_joules, prompts, decodes)):
                usage.prompt_debt_joules = unpaid
        return (*split_priced(interval.dynamic_joules, prompts, decodes, interval.presence), rates)

    def _settle(self, group: _Group, interval: _Interval) -> float:
        """Split the interval's dynamic energy with exact work; returns joules to idle."""
        shares, idle_joules, rates = self._split(group, interval, settle=True)
        for i, (usage, share) in enumerate(zip(interval.members, shares)):
            estimate = interval.estimates[i]
            usage.dynamic_joules_estimate -= estimate
            usage.weighted_estimate -= estimate * interval.weight
            usage.dynamic_joules_final += share
            usage.weighted_joules += share * interval.weight
            group.totals.attributed_joules += share
        if group.fixed_prefill_weight is None and group.idle.known:
            group.model.observe(interval.t1 - interval.t0, interval.dynamic_joules, rates)
        return idle_joules

    def _covered(self, group: _Group, usage: RequestUsage, t1: float) -> None:
        """A closed request the meter now covers: settle the intervals that waited only
        for it (each membership is visited once: O(1) amortized per interval member)."""
        if not usage.streaming and usage.output_tokens and usage.work_units is None:
            # Its tokens were made at the steps streams showed, not evenly over its life:
            # while prompts prefill every step is slower, and an even spread put output
            # there that the cost model then read as prompt work's (prompts priced 20-30%
            # low under a saturating curve, bench seeds 6-10).
            assert usage.closed_at is not None
            usage.token_ends = group.step_ends.token_ends(usage.output_tokens, usage.opened_at, usage.closed_at)
        for interval in usage.pending:  # type: ignore[assignment]
            assert isinstance(interval, _Interval)
            interval.uncovered -= 1
            if interval.uncovered == 0:
                group.totals.idle_joules += self._settle(group, interval)
                for member in interval.members:
                    member.pending_intervals -= 1
                    self._maybe_final(member, t1)
        usage.pending = []
        self._maybe_final(usage, t1)

    def _maybe_final(self, usage: RequestUsage, last_sample_t: float) -> None:
        if usage.final or usage.closed_at is None or usage.pending_intervals or usage.closed_at > last_sample_t:
            return
        usage.final = True
        usage.token_ends = None  # every interval it was in has settled
        usage.queued_after = None  # nothing of it is read again: no chain of past requests
        usage.dynamic_joules_estimate = 0.0  # exactly zero, not a float residue
        usage.weighted_estimate = 0.0
        if self._on_final is not None:
            try:
                self._on_final(usage)
            except Exception:
                log.exception("final-figure callback failed")

    def save_state(self) -> dict[str, dict[str, Any]]:
        """What each group learned (idle power, cost model, paces), as JSON-able data."""
        return {name: group.learned_state() for name, group in self._groups.items()}

    def load_state(self, states: Mapping[str, Any]) -> list[str]:
        """Restore what was learned (save_state's output, e.g. from before a restart);
        returns the groups restored. A group's state that does not fit this version is
        skipped: it is learned again, never half-loaded."""
        restored = []
        for name, state in states.items():
            group = self._groups.get(name)
            if group is None or not isinstance(state, Mapping):
                continue
            try:
                if group.restore(state):
                    restored.append(name)
            except (KeyError, TypeError, ValueError, AttributeError):
                log.warning("learned attribution state of %r is unreadable; learning it again", name)
        return restored

    # -- introspection --------------------------------------------------------------

    def totals(self) -> dict[str, GroupTotals]:
        return {name: group.totals for name, group in self._groups.items()}

    def idle_power_watts(self, group: str) -> float | None:
        return self._groups[group].idle.current_watts()

    def group_devices(self, group: str) -> tuple[str, ...]:
        return self._groups[group].devices

    def last_sample_seconds(self, group: str) -> float:
        """When the group's latest meter sample was taken (-inf before the first)."""
        last = self._groups[group].last_t
        return last if last is not None else float("-inf")

    def last_power_watts(self, group: str) -> float:
        return self._groups[group].last_power_watts

    @property
    def prefill_weight(self) -> float:
        """The latest interval's prefill weight, the largest over groups (one gauge)."""
        return max((g.prefill_weight for g in self._groups.values()), default=DEFAULT_PREFILL_WEIGHT)

    def costs_learned(self, group: str) -> bool:
        """Whether the group's cost model is fitted (else the prefill weight rules)."""
        g = self._groups[group]
        return g.fixed_prefill_weight is None and g.model.ready

    def in_flight(self, group: str) -> int:
        return len(self._groups[group].open)
