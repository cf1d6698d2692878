"""Energy sources. Each meter only measures: cumulative joules per device, timestamped."""

from proxy.meters.base import EnergySample, Meter, MeterError

__all__ = ["EnergySample", "Meter", "MeterError"]
