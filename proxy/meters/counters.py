"""Turning raw hardware and exporter counters into the never-decreasing joules meters report.

Every counter a meter reads can go backwards: RAPL's energy_uj wraps at
max_energy_range_uj (minutes to hours at server power), NVML's mJ counter restarts when
the driver reloads, and a Prometheus counter restarts with its exporter. `EnergyCounter`
absorbs all of that once, so each meter only says what its raw unit and wrap point are.

It also estimates *when* the raw value last changed. Sources that refresh slower than we
poll (NVML's counter every 20-100 ms, an exporter at its collection interval) return the
same value for several reads; a meter reports `changed_at_seconds` as its sample time so
that no interval of positive length appears to have used zero energy. The change happened
between the last read that still saw the old value and the first that saw the new one:
the midpoint is the estimate (a refresh's phase is uniform between two reads). Stamped at
the later read instead, every interval was late by half a polling period on average,
with jitter: energy drawn before a request started was shared with it. Where every read
sees a change (the source refreshes faster than we poll, as RAPL does), the read's own
time is the better estimate.
"""

from __future__ import annotations

import math


class EnergyCounter:
    """One device's counter: raw readings in, cumulative joules since the first reading out.

    `joules_per_unit` converts the raw unit (mJ -> 0.001, uJ -> 1e-6, J -> 1).
    `wrap_units` is where the raw counter rolls over to zero, when the source has one.
    """

    __slots__ = (
        "joules_per_unit",
        "wrap_units",
        "_last_raw",
        "_total_units",
        "changed_at_seconds",
        "_previous_change",
        "_last_read_seconds",
        "_last_read_changed",
        "resets",
        "wraps",
    )

    def __init__(self, joules_per_unit: float, wrap_units: float | None = None) -> None:
        if not joules_per_unit > 0 or math.isinf(joules_per_unit):
            raise ValueError(f"joules_per_unit must be a positive number, not {joules_per_unit!r}")
        self.joules_per_unit = joules_per_unit
        self.wrap_units = wrap_units
        self._last_raw: float | None = None
        # Accumulate in raw units and scale on the way out: integer counters (uJ, mJ) then
        # stay exact however long the proxy runs.
        self._total_units: float = 0
        self.changed_at_seconds: float | None = None
        self._previous_change: tuple[float, float] | None = None  # (seconds, joules)
        self._last_read_seconds: float | None = None
        self._last_read_changed = True
        self.resets = 0
        self.wraps = 0

    @property
    def joules(self) -> float:
        return self._total_units * self.joules_per_unit

    def update(self, raw: float, now_seconds: float) -> float:
        """Feed one raw reading taken at `now_seconds`; returns cumulative joules."""
        last = self._last_raw
        last_read, last_changed = self._last_read_seconds, self._last_read_changed
        self._last_read_seconds = now_seconds
        if last is None:
            self._last_raw = raw
            self.changed_at_seconds = now_seconds
            return 0.0
        self._last_read_changed = raw != last
        if raw == last:
            return self.joules
        delta = raw - last
        if delta < 0:
            delta = self._delta_across_rollover(last, raw)
        assert self.changed_at_seconds is not None  # set by the first reading
        self._previous_change = (self.changed_at_seconds, self.joules)
        self._total_units += delta
        self._last_raw = raw
        if last_changed or last_read is None or last_read >= now_seconds:
            self.changed_at_seconds = now_seconds
        else:
            self.changed_at_seconds = max(self.changed_at_seconds, (last_read + now_seconds) / 2)
        return self.joules

    def _delta_across_rollover(self, last: float, raw: float) -> float:
        # A wrap lands just past zero after a value near the top: the distance around the
        # ring is small. Anything else (driver reload, exporter restart) is a reset, and
        # the new value is what was counted since it. Either way we never go backwards.
        if self.wrap_units is not None:
            around = (self.wrap_units - last) + raw
            if 0 <= around <= self.wrap_units / 2:
                self.wraps += 1
                return around
        self.resets += 1
        return max(raw, 0)

    def watts(self) -> float | None:
        """Average power between the last two changes of the counter, once there were two."""
        if self._previous_change is None or self.changed_at_seconds is None:
            return None
        then_seconds, then_joules = self._previous_change
        elapsed = self.changed_at_seconds - then_seconds
        if elapsed <= 0:
            return None
        return (self.joules - then_joules) / elapsed


class PowerIntegrator:
    """Energy from instantaneous power readings, by the trapezoid rule between readings.

    For sources with no energy counter. Accuracy depends on the sampling period: what
    happens between two readings is assumed to ramp linearly.
    """

    __slots__ = ("joules", "_last")

    def __init__(self) -> None:
        self.joules = 0.0
        self._last: tuple[float, float] | None = None  # (seconds, watts)

    def update(self, watts: float, now_seconds: float) -> float:
        last = self._last
        if last is not None:
            then_seconds, then_watts = last
            elapsed = now_seconds - then_seconds
            if elapsed > 0:
                self.joules += 0.5 * (then_watts + watts) * elapsed
            elif elapsed < 0:
                return self.joules  # a stale reading raced a newer one; keep the newer
        self._last = (now_seconds, watts)
        return self.joules

    @property
    def watts(self) -> float | None:
        return None if self._last is None else self._last[1]
