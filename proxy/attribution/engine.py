"""The attribution engine: meter samples in, per-request joules out.

Each meter sample closes an interval per device group. Static shares are final at
once (presence is known); dynamic shares are estimates until every request present in
the interval has closed and reported its exact work, then the interval settles and the
estimates are replaced. Every interval's energy goes either to requests or to idle, so
request energy + idle energy = measured energy.

Dynamic energy follows work (DESIGN.md section 5). What the proxy sees of work is
indirect, so per group it learns: idle power; the cost of work (learning.py: joules per
prompt token, and decode power by batch size); when prompts were processed (prefill.py,
from the meter, first come first served); and paces from streams (timing.py).
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from proxy.attribution.learning import IdlePowerLearner, WorkCostLearner
from proxy.attribution.prefill import PrefillProgress, ProgressSpan
from proxy.attribution.split import decode_work, known_work, overlap, presence_shares, split_dynamic, split_priced
from proxy.attribution.timing import PaceLearner
from proxy.attribution.usage import RequestUsage
from proxy.meters.base import EnergySample

log = logging.getLogger("carbon_proxy.attribution")

DEFAULT_PREFILL_WEIGHT = 0.1
"""A prompt token costs about a tenth of an output token (batched prefill is compute
bound and fast; decode is memory bound). Used until the group's costs are learned, or
configured (then always)."""
DEFAULT_PREFILL_TOKENS_PER_SECOND = 5000.0
"""Until learned from streams: how long a prompt of n tokens takes to prefill."""
DEFAULT_DECODE_SECONDS_PER_TOKEN = 0.03
"""Until learned from streams: a decoding sequence's time per output token."""
DEFAULT_FASTEST_DECODE_SECONDS_PER_TOKEN = 0.01
"""Until learned from streams: a sequence decodes no faster than this (100 tokens/s)."""


@dataclass(slots=True, eq=False)
class _Interval:
    t0: float
    t1: float
    dynamic_joules: float
    weight: float
    members: list[RequestUsage]
    presence: array  # seconds present, per member
    binned: array  # output tokens seen in the interval, per member (streams)
    estimates: array  # dynamic joules credited as estimates, per member
    progress: ProgressSpan  # the group's prefill progress at t0 and t1
    uncovered: int = 0
    """Members not yet closed and covered by a sample; the interval settles at 0."""


@dataclass(slots=True)
class GroupTotals:
    measured_joules: float = 0.0
    idle_joules: float = 0.0
    attributed_joules: float = 0.0
    """Final request energy: static shares plus settled dynamic shares."""
    idle_seconds: float = 0.0


@dataclass(slots=True, eq=False)
class _Group:
    name: str
    devices: tuple[str, ...]
    idle: IdlePowerLearner
    cost: WorkCostLearner
    pace: PaceLearner = field(default_factory=lambda: PaceLearner(DEFAULT_PREFILL_TOKENS_PER_SECOND))
    prefill: PrefillProgress = field(default_factory=PrefillProgress)
    open: set[RequestUsage] = field(default_factory=set)
    closed_since_sample: list[RequestUsage] = field(default_factory=list)
    last_t: float | None = None
    last_joules: float = 0.0
    last_power_watts: float = 0.0
    totals: GroupTotals = field(default_factory=GroupTotals)


class AttributionEngine:
    def __init__(
        self,
        groups: Mapping[str, Sequence[str]],
        *,
        idle_power_watts: float | Mapping[str, float] | None = None,
        prefill_weight: float | None = None,
        weight_at: Callable[[float], float] | None = None,
        on_final: Callable[[RequestUsage], None] | None = None,
    ) -> None:
        """groups: group name -> meter device ids (an upstream's `devices`).
        idle_power_watts: per device (a number, or per device id), or None to learn it.
        prefill_weight: a fixed prefill weight, or None to learn each group's costs.
        weight_at: a price per joule at a monotonic time (e.g. grid intensity), summed
        alongside joules so that each interval is priced at its own time."""
        self._groups: dict[str, _Group] = {}
        for name, devices in groups.items():
            fixed = None
            if isinstance(idle_power_watts, (int, float)):
                fixed = float(idle_power_watts) * len(devices)
            elif isinstance(idle_power_watts, Mapping):
                fixed = sum(float(idle_power_watts.get(d, 0.0)) for d in devices)
            cost = WorkCostLearner(fixed_prefill_weight=prefill_weight, default_prefill_weight=DEFAULT_PREFILL_WEIGHT)
            self._groups[name] = _Group(name, tuple(devices), IdlePowerLearner(fixed_watts=fixed), cost)
        self._weight_at = weight_at or (lambda t: 0.0)
        self._on_final = on_final

    # -- request side ---------------------------------------------------------------

    @property
    def group_names(self) -> Iterable[str]:
        return self._groups.keys()

    def open(self, group: str, at: float, *, streaming: bool, prompt_tokens_estimate: int = 0) -> RequestUsage:
        usage = RequestUsage(group=group, opened_at=at, streaming=streaming, prompt_tokens_estimate=prompt_tokens_estimate)
        g = self._groups[group]
        g.open.add(usage)
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
        group.open.discard(usage)
        group.closed_since_sample.append(usage)

    def provisional(self, usage: RequestUsage, now: float) -> tuple[float, float, float]:
        """(joules, weighted joules, reserved seconds) for a request that just closed,
        before the meter has covered its end: credited shares plus the tail since the
        last sample, estimated from the group's recent power."""
        group = self._groups[usage.group]
        joules = usage.energy_joules
        weighted = usage.weighted_joules + usage.weighted_estimate
        reserved = usage.reserved_seconds
        if group.last_t is None:
            return joules, weighted, reserved
        start = max(group.last_t, usage.opened_at)
        end = usage.closed_at if usage.closed_at is not None else now
        tail = end - start
        if tail > 0:
            present = max(1, len(group.open) + len(group.closed_since_sample))
            tail_joules = group.last_power_watts * tail / present
            joules += tail_joules
            weighted += tail_joules * self._weight_at(end)
            reserved += tail / present
        return joules, weighted, reserved

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
        group.totals.measured_joules += energy
        weight = self._weight_at((t0 + t1) / 2)

        members = [u for u in group.open if u.opened_at < t1]
        members += [u for u in group.closed_since_sample if u.closed_at > t0 and u.opened_at < t1]  # type: ignore[operator]
        if not members:
            group.idle.observe(group.last_power_watts)

        idle_watts = group.idle.watts(fallback_watts=group.last_power_watts)
        static_joules = min(energy, idle_watts * duration)
        spans = [(u.opened_at, u.closed_at if u.closed_at is not None else t1) for u in members]
        shares, idle_seconds = presence_shares(spans, t0, t1)
        group.totals.idle_seconds += idle_seconds
        idle_joules = static_joules * idle_seconds / duration
        static_per_second = static_joules / duration
        binned = array("d")
        for usage, share in zip(members, shares):
            credit = static_per_second * share
            usage.static_joules += credit
            usage.weighted_joules += credit * weight
            usage.reserved_seconds += share
            group.totals.attributed_joules += credit
            binned.append(usage.unsampled_output_tokens)
            usage.sampled_output_tokens += usage.unsampled_output_tokens
            usage.unsampled_output_tokens = 0

        dynamic_joules = energy - static_joules
        progress = self._prefill_progress(group, t0, t1, members, dynamic_joules)
        interval = _Interval(
            t0=t0,
            t1=t1,
            dynamic_joules=dynamic_joules,
            weight=weight,
            members=members,
            presence=array("d", (u.presence_seconds(t0, t1) for u in members)),
            binned=binned,
            estimates=array("d", bytes(8 * len(members))),
            progress=progress,
        )
        interval.uncovered = sum(1 for u in members if u.closed_at is None or u.closed_at > t1)
        if interval.uncovered == 0:
            idle_joules += self._settle(group, interval)
        else:
            self._estimate(group, interval)
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
                self._covered(group, usage, t1)
        group.closed_since_sample = waiting

    def _prefill_progress(
        self, group: _Group, t0: float, t1: float, members: list[RequestUsage], dynamic_joules: float
    ) -> ProgressSpan:
        """Advance the group's prefill progress over [t0, t1]: requests that showed their
        prefill done jump it, the energy not drawn by decoding measures the rest."""
        prefill = group.prefill
        for usage in members:
            first = usage.first_token_at
            if first is not None and t0 < first <= t1:
                prefill.done_by(usage, first)
                usage.prefill_done_at = first  # exact, even where progress passed it earlier
        fastest = group.pace.pace().fastest_decode_seconds_per_token or DEFAULT_FASTEST_DECODE_SECONDS_PER_TOKEN
        for usage in group.closed_since_sample:
            end = usage.closed_at
            if end is not None and end <= t1 and usage.prefill_done_at is None:
                # A request that made n output tokens was done prefilling some n steps before its end.
                decoded = 0.0 if usage.streaming else (usage.output_tokens or 0) * fastest
                prefill.done_by(usage, max(usage.opened_at, end - decoded))
        costs = group.cost.costs()
        if costs is None or costs.prompt_joules_per_token <= 0:
            processed = group.pace.pace().prefill_tokens_per_second * (t1 - t0)
        else:
            decode_seconds = sequence_seconds = 0.0
            for usage in members:
                start = usage.first_token_at if usage.streaming else usage.prefill_done_at
                if start is not None:
                    end = usage.closed_at if usage.closed_at is not None else t1
                    decoding = overlap(start, end, t0, t1)
                    sequence_seconds += decoding
                    if decoding > decode_seconds:
                        decode_seconds = decoding
            decode_joules = costs.decode_joules(decode_seconds, sequence_seconds)
            processed = max(0.0, dynamic_joules - decode_joules) / costs.prompt_joules_per_token
        return prefill.advance(t0, t1, processed)

    def _works(self, group: _Group, interval: _Interval) -> tuple[list[float], list[float], tuple[float, float, float, float]]:
        """Per member: prompt work and decode work (output tokens); and the interval's
        totals of prompt and output tokens, seconds decoding, and sequence-seconds
        decoding. With learned costs, prompt work is in joules (split_priced); before, in
        output tokens (prefill weight x prompt tokens)."""
        pace = group.pace.pace()
        rows: list[tuple[float, float, float]] = []
        prompt_total = output_total = sequence_seconds = decode_seconds = 0.0
        for usage, binned in zip(interval.members, interval.binned):
            row = known_work(usage, interval.t0, interval.t1, binned, pace, (interval.progress.start, interval.progress.end))
            rows.append(row)
            prompt, output, decoding = row
            prompt_total += prompt
            output_total += output
            sequence_seconds += decoding
            if decoding > decode_seconds:  # the batch decodes as one: while any member did
                decode_seconds = decoding
        totals = (prompt_total, output_total, decode_seconds, sequence_seconds)
        costs = group.cost.costs()
        price = group.cost.fallback_weight if costs is None else costs.prompt_joules_per_token
        prompts = [price * p for p, _, _ in rows]
        streamed = [u.streaming for u in interval.members]
        fallback_tokens_per_second = 1.0 / (pace.decode_seconds_per_token or DEFAULT_DECODE_SECONDS_PER_TOKEN)
        decodes = decode_work(rows, streamed, output_total, sequence_seconds, fallback_tokens_per_second)
        return prompts, decodes, totals

    def _split(
        self, group: _Group, interval: _Interval, settle: bool
    ) -> tuple[list[float], float, tuple[float, float, float, float]]:
        prompts, decodes, totals = self._works(group, interval)
        if group.cost.costs() is None:
            works = [p + d for p, d in zip(prompts, decodes)]
            return (*split_dynamic(interval.dynamic_joules, works, interval.presence), totals)
        shares, idle = split_priced(interval.dynamic_joules, prompts, decodes, interval.presence)
        prompt_total, output_total = totals[0], totals[1]
        if settle and prompt_total > 0 and output_total > 0:
            # The interval's prefill weight, for metrics: joules per prompt token paid over
            # joules per output token left.
            prefill_joules = min(interval.dynamic_joules, sum(prompts))
            decode_joules = interval.dynamic_joules - prefill_joules
            if decode_joules > 0:
                group.cost.last_weight = (prefill_joules / prompt_total) / (decode_joules / output_total)
        return shares, idle, totals

    def _estimate(self, group: _Group, interval: _Interval) -> None:
        shares, _, _ = self._split(group, interval, settle=False)
        for i, (usage, share) in enumerate(zip(interval.members, shares)):
            interval.estimates[i] = share
            usage.dynamic_joules_estimate += share
            usage.weighted_estimate += share * interval.weight

    def _settle(self, group: _Group, interval: _Interval) -> float:
        """Split the interval's dynamic energy with exact work; returns joules to idle."""
        shares, idle_joules, totals = self._split(group, interval, settle=True)
        for i, (usage, share) in enumerate(zip(interval.members, shares)):
            estimate = interval.estimates[i]
            usage.dynamic_joules_estimate -= estimate
            usage.weighted_estimate -= estimate * interval.weight
            usage.dynamic_joules_final += share
            usage.weighted_joules += share * interval.weight
            group.totals.attributed_joules += share
        group.cost.observe(interval.t1 - interval.t0, interval.dynamic_joules, *totals)
        return idle_joules

    def _covered(self, group: _Group, usage: RequestUsage, t1: float) -> None:
        """A closed request the meter now covers: settle the intervals that waited only
        for it (each membership is visited once: O(1) amortized per interval member)."""
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
        usage.dynamic_joules_estimate = 0.0  # exactly zero, not a float residue
        usage.weighted_estimate = 0.0
        if self._on_final is not None:
            try:
                self._on_final(usage)
            except Exception:
                log.exception("final-figure callback failed")

    # -- introspection --------------------------------------------------------------

    def totals(self) -> dict[str, GroupTotals]:
        return {name: group.totals for name, group in self._groups.items()}

    def idle_power_watts(self, group: str) -> float | None:
        return self._groups[group].idle.current_watts()

    def group_devices(self, group: str) -> tuple[str, ...]:
        return self._groups[group].devices

    def last_power_watts(self, group: str) -> float:
        return self._groups[group].last_power_watts

    @property
    def prefill_weight(self) -> float:
        """The latest interval's prefill weight, the largest over groups (one gauge)."""
        return max((g.cost.prefill_weight for g in self._groups.values()), default=DEFAULT_PREFILL_WEIGHT)

    def costs_learned(self, group: str) -> bool:
        """Whether the group's cost model is fitted (else the prefill weight rules)."""
        return self._groups[group].cost.costs() is not None

    def in_flight(self, group: str) -> int:
        return len(self._groups[group].open)
