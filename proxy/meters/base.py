"""The one interface every energy source implements.

A meter reports *cumulative* joules per device since an arbitrary origin, never
decreasing: wraparound and counter resets are the meter's business, so everything
above it can subtract two samples and get the energy of the interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence


class MeterError(Exception):
    """A meter could not start or could not read. The message says what to do instead."""


@dataclass(frozen=True, slots=True)
class EnergySample:
    timestamp_seconds: float
    """time.monotonic() when the reading was taken (or the counter last refreshed)."""
    joules_by_device: Mapping[str, float]
    """Cumulative, monotonically non-decreasing joules per device id."""
    power_watts_by_device: Mapping[str, float] = field(default_factory=dict)
    """Instantaneous or short-average power where the source offers it (informational)."""


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What a meter learned about a device when it started, for attribution's prior
    (attribution/prior.py): the model name the driver or exporter gives, and the board
    power limit in force. None where the source does not say."""

    name: str | None = None
    power_limit_watts: float | None = None


def device_facts(meter: object) -> Mapping[str, DeviceFacts]:
    """Device id -> facts, from a started meter that offers them (nvml, scrape); else {}."""
    facts = getattr(meter, "device_facts", None)
    return facts() if callable(facts) else {}


class Meter(Protocol):
    kind: str
    """Short name used in X-Emissions-Basis: nvml, scrape, rapl, estimate, sim."""
    method: str
    """'measured' for hardware counters, 'estimated' for models of energy."""

    def device_ids(self) -> Sequence[str]:
        """The devices this meter reports, as the ids upstreams name in `devices`."""
        ...

    async def start(self) -> None:
        """Open handles; raise MeterError with a clear message when the source is unusable."""
        ...

    async def read(self) -> EnergySample:
        """One reading. Must not block the event loop (blocking reads go to a thread)."""
        ...

    async def close(self) -> None: ...


class WorkAwareMeter(Meter, Protocol):
    """A meter that models energy from observed work instead of measuring it (estimate, sim)."""

    def observe_work(self, device_ids: Sequence[str], prompt_tokens: int, output_tokens: int, model: str | None) -> None: ...
