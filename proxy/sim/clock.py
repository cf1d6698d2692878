"""Virtual time for driving a SimGpu (and the batching engine) without sleeping."""

from __future__ import annotations


class VirtualClock:
    """A callable clock that only moves when told to; pass it as SimGpu(clock=...)."""

    __slots__ = ("seconds",)

    def __init__(self, start_seconds: float = 0.0) -> None:
        self.seconds = float(start_seconds)

    def __call__(self) -> float:
        return self.seconds

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("virtual time only moves forward")
        self.seconds += seconds
        return self.seconds
