"""The attribution engine: meter samples in, per-request joules out.

Each meter sample closes an interval per device group. Static shares are final at
once (presence is known); dynamic shares are estimates until every request present in
the interval has closed and reported its exact work, then the interval settles and the
estimates are replaced. Every interval's energy goes either to requests or to idle, so
request energy + idle energy = measured energy.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from proxy.attribution.learning import IdlePowerLearner, WorkCostLearner
from proxy.attribution.split import known_work, presence_shares, split_dynamic
from proxy.attribution.usage import RequestUsage
from proxy.meters.base import EnergySample

log = logging.getLogger("carbon_proxy.attribution")

DEFAULT_PREFILL_WEIGHT = 0.1
"""A prompt token costs about a tenth of an output token (batched prefill is compute
bound and fast; decode is memory bound). Learned online when not configured."""
DEFAULT_PREFILL_TOKENS_PER_SECOND = 5000.0
"""Used only to place a non-streaming request's prefill inside its duration."""


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
    open_members: int


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
    open: set[RequestUsage] = field(default_factory=set)
    closed_since_sample: list[RequestUsage] = field(default_factory=list)
    pending: list[_Interval] = field(default_factory=list)
    last_t: float | None = None
    last_joules: float = 0.0
    last_power_watts: float = 0.0
    totals: GroupTotals = field(default_factory=GroupTotals)
    rate_units_per_second: float = 0.0
    """Work per present-second, for estimating open non-streaming requests."""


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
        weight_at: a price per joule at a monotonic time (e.g. grid intensity), summed
        alongside joules so that each interval is priced at its own time."""
        self._groups: dict[str, _Group] = {}
        for name, devices in groups.items():
            fixed = None
            if isinstance(idle_power_watts, (int, float)):
                fixed = float(idle_power_watts) * len(devices)
            elif isinstance(idle_power_watts, Mapping):
                fixed = sum(float(idle_power_watts.get(d, 0.0)) for d in devices)
            self._groups[name] = _Group(name, tuple(devices), IdlePowerLearner(fixed_watts=fixed))
        self._cost = WorkCostLearner(fixed_prefill_weight=prefill_weight, default_prefill_weight=DEFAULT_PREFILL_WEIGHT)
        self._weight_at = weight_at or (lambda t: 0.0)
        self._on_final = on_final

    # -- request side ---------------------------------------------------------------

    @property
    def group_names(self) -> Iterable[str]:
        return self._groups.keys()

    def open(self, group: str, at: float, *, streaming: bool, prompt_tokens_estimate: int = 0) -> RequestUsage:
        usage = RequestUsage(group=group, opened_at=at, streaming=streaming, prompt_tokens_estimate=prompt_tokens_estimate)
        self._groups[group].open.add(usage)
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

        interval = _Interval(
            t0=t0,
            t1=t1,
            dynamic_joules=energy - static_joules,
            weight=weight,
            members=members,
            presence=array("d", (u.presence_seconds(t0, t1) for u in members)),
            binned=binned,
            estimates=array("d", bytes(8 * len(members))),
            open_members=sum(1 for u in members if u.closed_at is None or u.closed_at > t1),
        )
        if interval.open_members == 0:
            idle_joules += self._settle(group, interval)
        else:
            self._estimate(group, interval)
            for usage in members:
                usage.pending_intervals += 1
            group.pending.append(interval)
        group.totals.idle_joules += idle_joules
        self._settle_pending(group, t1)
        # Closed requests the meter has now covered become final once nothing is pending.
        waiting = []
        for usage in group.closed_since_sample:
            if usage.closed_at > t1:  # type: ignore[operator]
                waiting.append(usage)  # closed after the reading was taken: still uncovered
            else:
                self._maybe_final(usage, t1)
        group.closed_since_sample = waiting

    def _works(self, group: _Group, interval: _Interval, exact: bool) -> tuple[list[float], float, float]:
        """Work per member, and the interval's prompt and output totals (for learning)."""
        weight = self._cost.prefill_weight
        works: list[float] = []
        prompt_total = output_total = 0.0
        for usage, binned, present in zip(interval.members, interval.binned, interval.presence):
            if not exact and usage.closed_at is None and not usage.streaming:
                works.append(group.rate_units_per_second * present)
                continue
            prompt, output = known_work(usage, interval.t0, interval.t1, binned, DEFAULT_PREFILL_TOKENS_PER_SECOND)
            prompt_total += prompt
            output_total += output
            works.append(weight * prompt + output)
        return works, prompt_total, output_total

    def _estimate(self, group: _Group, interval: _Interval) -> None:
        works, _, _ = self._works(group, interval, exact=False)
        shares, _ = split_dynamic(interval.dynamic_joules, works, interval.presence)
        for i, (usage, share) in enumerate(zip(interval.members, shares)):
            interval.estimates[i] = share
            usage.dynamic_joules_estimate += share
            usage.weighted_estimate += share * interval.weight

    def _settle(self, group: _Group, interval: _Interval) -> float:
        """Split the interval's dynamic energy with exact work; returns joules to idle."""
        works, prompt_total, output_total = self._works(group, interval, exact=True)
        shares, idle_joules = split_dynamic(interval.dynamic_joules, works, interval.presence)
        for i, (usage, share) in enumerate(zip(interval.members, shares)):
            estimate = interval.estimates[i]
            usage.dynamic_joules_estimate -= estimate
            usage.weighted_estimate -= estimate * interval.weight
            usage.dynamic_joules_final += share
            usage.weighted_joules += share * interval.weight
            group.totals.attributed_joules += share
        present = sum(interval.presence)
        if present > 0:
            rate = sum(works) / present
            group.rate_units_per_second = rate if group.rate_units_per_second == 0 else 0.8 * group.rate_units_per_second + 0.2 * rate
        self._cost.observe(interval.dynamic_joules, prompt_total, output_total)
        return idle_joules

    def _settle_pending(self, group: _Group, t1: float) -> None:
        if not group.pending:
            return
        still: list[_Interval] = []
        for interval in group.pending:
            if any(u.closed_at is None or u.closed_at > t1 for u in interval.members):
                still.append(interval)
                continue
            group.totals.idle_joules += self._settle(group, interval)
            for usage in interval.members:
                usage.pending_intervals -= 1
                self._maybe_final(usage, t1)
        group.pending = still

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
        return self._cost.prefill_weight

    def in_flight(self, group: str) -> int:
        return len(self._groups[group].open)
