"""Grid carbon intensity: the reading and the provider interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class IntensityReading:
    g_per_kwh: float
    """Location-based grid intensity in gCO2e/kWh."""
    source: str
    """What produced it, as shown in X-Emissions-Basis: 'constant', 'table:DEU', 'electricitymaps:DE'."""
    stale: bool = False
    """True when the live source failed and this is an old value or the table fallback."""
    estimated: bool = False
    """True for forecasts or modelled values rather than measured data."""
    marginal: bool = False
    """True for marginal-emissions signals (WattTime MOER) rather than average."""
    valid_from_unix: float | None = None
    """Wall-clock start of the data point this value belongs to, when the source says."""

    def basis(self) -> str:
        """The `intensity=...` part of X-Emissions-Basis."""
        text = f"intensity={self.source}"
        if self.stale:
            text += "; stale=true"
        if self.estimated:
            text += "; intensity_estimated=true"
        if self.marginal:
            text += "; marginal=true"
        return text


class IntensityProvider(Protocol):
    async def start(self) -> None:
        """Begin background polling. Never raises for an outage: falls back instead."""
        ...

    def current(self) -> IntensityReading:
        """The value to use now. Cached; never blocks, never raises."""
        ...

    def at(self, unix_seconds: float) -> IntensityReading:
        """The value that applied at a past wall-clock time (for intervals of a long stream)."""
        ...

    async def close(self) -> None: ...


class ConstantIntensity:
    """A fixed intensity from config or the command line."""

    def __init__(self, g_per_kwh: float) -> None:
        self._reading = IntensityReading(g_per_kwh=float(g_per_kwh), source="constant")

    async def start(self) -> None:
        return None

    def current(self) -> IntensityReading:
        return self._reading

    def at(self, unix_seconds: float) -> IntensityReading:
        return self._reading

    async def close(self) -> None:
        return None
