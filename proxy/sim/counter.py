"""What a real energy counter shows of the SimGpu's exact energy (measurement realism).

A board's energy counter does not move continuously: NVML's refreshes every 20-100 ms
depending on the GPU and driver, with jitter; the DCGM exporter that Kubernetes setups
scrape publishes it once a second. Each refresh's increment is off by a few percent
(sensor accuracy: NVIDIA documents +/-5% on power readings), some refreshes are missed
(the reader sees the previous value again: a stale read), and the proxy only learns the
time of a change when it next polls: the sample is stamped as the real meters stamp it
(proxy.meters.counters.EnergyCounter, the same code: between the last poll that saw the
old value and the first that saw the new one).

The noise is in the measurement only; the ground truth stays the SimGpu's exact energy,
and the counter's long-run total stays unbiased (noise has mean zero).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from proxy.meters.counters import EnergyCounter
from proxy.sim.gpu import SimGpu


@dataclass(frozen=True, slots=True)
class CounterSpec:
    refresh_seconds: float = 0.1
    jitter_fraction: float = 0.0
    """Each refresh period is refresh_seconds x (1 +/- this), uniformly."""
    noise_fraction: float = 0.0
    """Gaussian relative error on each refresh's increment."""
    stale_probability: float = 0.0
    """A refresh that does not happen (the next one carries its energy)."""
    name: str = "exact"

    @classmethod
    def draw(cls, rng: random.Random) -> "CounterSpec":
        """An NVML-like counter: 20-100 ms refresh, 10-30% jitter, 1-4% noise, 2-8% stale."""
        return cls(
            refresh_seconds=rng.uniform(0.02, 0.1),
            jitter_fraction=rng.uniform(0.1, 0.3),
            noise_fraction=rng.uniform(0.01, 0.04),
            stale_probability=rng.uniform(0.02, 0.08),
            name="nvml-like",
        )

    @classmethod
    def coarse(cls, rng: random.Random) -> "CounterSpec":
        """The DCGM exporter at a 1 s collection interval (what deploy/ sets)."""
        return cls(
            refresh_seconds=1.0,
            jitter_fraction=rng.uniform(0.0, 0.05),
            noise_fraction=rng.uniform(0.01, 0.04),
            stale_probability=0.0,
            name="dcgm-1s",
        )


class RealisticCounter:
    """Call `refresh(now)` at `next_refresh_seconds`, `read(now)` at each poll."""

    def __init__(self, gpu: SimGpu, spec: CounterSpec, seed: int = 0) -> None:
        if spec.refresh_seconds <= 0:
            raise ValueError("refresh_seconds must be positive")
        self._gpu = gpu
        self._spec = spec
        self._rng = random.Random(seed)
        start = gpu.now()
        self._exact_at_refresh = gpu.energy_joules(start)
        self._shown_joules = self._exact_at_refresh
        self._stamper = EnergyCounter(1.0)  # what a meter makes of the shown value
        self.next_refresh_seconds = start + self._period()

    def _period(self) -> float:
        spec = self._spec
        return spec.refresh_seconds * (1.0 + self._rng.uniform(-spec.jitter_fraction, spec.jitter_fraction))

    def refresh(self, now: float) -> None:
        spec = self._spec
        self.next_refresh_seconds = now + self._period()
        if self._rng.random() < spec.stale_probability:
            return
        exact = self._gpu.energy_joules(now)
        increment = exact - self._exact_at_refresh
        self._exact_at_refresh = exact
        if spec.noise_fraction > 0:
            increment *= max(0.0, self._rng.gauss(1.0, spec.noise_fraction))
        self._shown_joules += increment

    def read(self, now: float) -> tuple[float, dict[str, float]]:
        """(stamp: when the meter places the current value, joules per device)."""
        self._stamper.update(self._shown_joules, now)
        stamp = self._stamper.changed_at_seconds
        assert stamp is not None
        per_device = self._shown_joules / len(self._gpu.device_ids)
        return stamp, {device: per_device for device in self._gpu.device_ids}
