"""A simulated accelerator group whose energy counter, and the truth behind it, are exact.

Power is piecewise constant: it changes only when the work on the group changes (a
request arrives or leaves, a sequence joins or leaves the decode batch, a prefill or
diffusion rate is set). Between two changes the group draws

    power = idle_power_watts * devices + min(dynamic, (max - idle) * devices)

so energy is integrated exactly, segment by segment, and split evenly over the devices.

Ground truth is defined per request id (the yardstick the proxy's attribution is judged
against), for every segment:
- dynamic energy goes to the requests whose work drew it: the decode power of a batch
  of B sequences is shared equally by the B sequences (each produced one token per step);
  prefill and diffusion power belong to the request whose tokens or pixels they process;
- static (idle) energy is shared equally by the requests present at that instant
  (arrived and not yet departed, whether working, queued or streaming out);
- with no request present, static energy is idle energy, kept apart (``idle_joules``).
So ``sum(ground_truth_joules(r) for r in request_ids()) + idle_joules == energy_joules()``
up to float rounding, at every instant.

Shares are kept with cumulative per-member indices (energy per present request and per
decoding sequence since the start), so a change costs O(1) however many requests are in
flight; only requests with their own power (prefill, diffusion) are touched per segment.

The clock is injectable: tests and benchmarks drive it in virtual time.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from proxy.sim.physics import Physics
from proxy.sim.power import PowerModel

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class RequestEnergy:
    """The exact energy one request caused on the group, both devices' worth together."""

    dynamic_joules: float
    static_joules: float

    @property
    def total_joules(self) -> float:
        return self.dynamic_joules + self.static_joules


class SimGpu:
    def __init__(
        self,
        device_ids: Sequence[str] = ("0",),
        *,
        idle_power_watts: float = 70.0,
        max_power_watts: float = 700.0,
        power_model: PowerModel | None = None,
        clock: Clock = time.monotonic,
        refresh_seconds: float = 0.0,
        noise_fraction: float = 0.0,
        seed: int = 0,
        counter_offset_joules: float = 0.0,
        model_name: str = "NVIDIA H100 80GB HBM3",
        physics: Physics | None = None,
    ) -> None:
        if not device_ids:
            raise ValueError("a SimGpu needs at least one device id")
        if len(set(device_ids)) != len(device_ids):
            raise ValueError(f"device ids must be unique, got {list(device_ids)}")
        if idle_power_watts < 0 or max_power_watts < idle_power_watts:
            raise ValueError("need 0 <= idle_power_watts <= max_power_watts")
        if refresh_seconds < 0 or noise_fraction < 0:
            raise ValueError("refresh_seconds and noise_fraction must be non-negative")
        self.device_ids: tuple[str, ...] = tuple(str(d) for d in device_ids)
        self.idle_power_watts = float(idle_power_watts)
        self.max_power_watts = float(max_power_watts)
        self.power_model = power_model or PowerModel()
        self.physics = physics
        """A step physics (proxy.sim.physics): the batching engine then hands over each step's
        energy per request (set_step_watts) instead of prefill rates and a decode batch."""
        self.model_name = model_name
        self.refresh_seconds = float(refresh_seconds)
        self.noise_fraction = float(noise_fraction)
        self.counter_offset_joules = float(counter_offset_joules)
        self._clock = clock
        self._rng = random.Random(seed)
        devices = len(self.device_ids)
        self._devices = devices
        self._idle_watts = self.idle_power_watts * devices
        self._headroom_watts = (self.max_power_watts - self.idle_power_watts) * devices

        self._last_seconds = clock()
        self._energy_joules = 0.0
        self._idle_joules = 0.0
        # Presence: request id -> static index when it arrived.
        self._present: dict[str, float] = {}
        self._static_index_joules = 0.0
        # Decode batch: request id -> decode index when it joined.
        self._decoding: dict[str, float] = {}
        self._decode_index_joules = 0.0
        self._decode_watts = 0.0  # effective, whole batch
        # Work with its own power (prefill, diffusion): nominal and effective watts.
        self._own_watts_nominal: dict[str, float] = {}
        self._own_watts: dict[str, float] = {}
        self._prefilling: set[str] = set()
        self._power_watts = self._idle_watts
        # Settled ground truth: request id -> [dynamic_joules, static_joules].
        self._ledger: dict[str, list[float]] = {}
        # Counter refresh (NVML-like): the latest boundary passed and the energy there.
        self._snapshot_seconds = self._boundary(self._last_seconds)
        self._snapshot_joules = 0.0

    # -- time ---------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def _boundary(self, t: float) -> float:
        r = self.refresh_seconds
        return t if r <= 0 else min(t, math.floor(t / r) * r)

    def _advance(self, now: float | None) -> None:
        """Integrate the current (constant) power from the last change up to `now`."""
        t = self._clock() if now is None else now
        dt = t - self._last_seconds
        if dt <= 0:
            return  # a clock that steps back is treated as standing still
        if self.refresh_seconds > 0:
            boundary = self._boundary(t)
            if boundary > self._last_seconds:
                self._snapshot_seconds = boundary
                self._snapshot_joules = self._energy_joules + self._power_watts * (
                    boundary - self._last_seconds
                )
        idle_joules = self._idle_watts * dt
        segment_joules = idle_joules
        if self._present:
            self._static_index_joules += idle_joules / len(self._present)
        else:
            self._idle_joules += idle_joules
        if self._decoding:
            decode_joules = self._decode_watts * dt
            segment_joules += decode_joules
            self._decode_index_joules += decode_joules / len(self._decoding)
        for request_id, watts in self._own_watts.items():
            own_joules = watts * dt
            segment_joules += own_joules
            self._entry(request_id)[0] += own_joules
        self._energy_joules += segment_joules
        self._last_seconds = t

    def _entry(self, request_id: str) -> list[float]:
        entry = self._ledger.get(request_id)
        if entry is None:
            entry = self._ledger[request_id] = [0.0, 0.0]
        return entry

    def _recompute_load(self) -> None:
        """New dynamic power after a work change: model, noise, then the board cap."""
        devices = self._devices
        decode_nominal = self.power_model.decode_watts(len(self._decoding)) * devices
        nominal = decode_nominal + sum(self._own_watts_nominal.values())
        effective = nominal
        if self.noise_fraction > 0 and nominal > 0:
            # The same work never costs exactly the same energy twice (clocks, temperature).
            factor = min(2.0, max(0.0, self._rng.gauss(1.0, self.noise_fraction)))
            effective = nominal * factor
        effective = min(effective, self._headroom_watts)
        scale = effective / nominal if nominal > 0 else 0.0
        self._decode_watts = decode_nominal * scale
        self._own_watts = {rid: w * scale for rid, w in self._own_watts_nominal.items() if w > 0}
        self._power_watts = self._idle_watts + self._decode_watts + sum(self._own_watts.values())

    # -- presence (static share) ----------------------------------------------------------

    def request_arrived(self, request_id: str, now: float | None = None) -> None:
        """From now on the request shares the static power of the group."""
        if request_id in self._present:
            raise ValueError(f"request {request_id!r} is already present")
        self._advance(now)
        self._entry(request_id)
        self._present[request_id] = self._static_index_joules

    def request_departed(self, request_id: str, now: float | None = None) -> None:
        """The request is gone (response sent or client gone); its work must have ended."""
        self._advance(now)
        arrived_index = self._present.pop(request_id, None)
        if arrived_index is not None:
            self._entry(request_id)[1] += self._static_index_joules - arrived_index
        # Work left running by a careless caller ends here too, so nothing leaks.
        if request_id in self._decoding or request_id in self._own_watts_nominal:
            self._leave_decode(request_id)
            self._own_watts_nominal.pop(request_id, None)
            self._recompute_load()

    def is_present(self, request_id: str) -> bool:
        return request_id in self._present

    def present_request_ids(self) -> list[str]:
        return list(self._present)

    # -- work (dynamic share) -------------------------------------------------------------

    def update_decode_batch(
        self, joined: Iterable[str] = (), left: Iterable[str] = (), now: float | None = None
    ) -> None:
        """Sequences start or stop decoding; batch power follows the new batch size."""
        self._advance(now)
        changed = False
        for request_id in left:
            changed |= self._leave_decode(request_id)
        for request_id in joined:
            if request_id not in self._decoding:
                self._entry(request_id)
                self._decoding[request_id] = self._decode_index_joules
                changed = True
        if changed:
            self._recompute_load()

    def _leave_decode(self, request_id: str) -> bool:
        joined_index = self._decoding.pop(request_id, None)
        if joined_index is None:
            return False
        self._entry(request_id)[0] += self._decode_index_joules - joined_index
        return True

    def set_own_watts(self, watts_by_request: dict[str, float], now: float | None = None) -> None:
        """Set the dynamic watts (whole group) that requests draw on their own; 0 clears."""
        if not watts_by_request:
            return
        self._advance(now)
        for request_id, watts in watts_by_request.items():
            if watts > 0:
                self._entry(request_id)
                self._own_watts_nominal[request_id] = float(watts)
            else:
                self._own_watts_nominal.pop(request_id, None)
        self._recompute_load()

    def set_prefill_rates(
        self, tokens_per_second_by_request: dict[str, float], now: float | None = None
    ) -> None:
        """Prompt processing rates for the coming segment (replaces all previous rates)."""
        watts_per_device = self.power_model.prefill_watts
        watts = dict.fromkeys(self._prefilling, 0.0)
        for request_id, rate in tokens_per_second_by_request.items():
            watts[request_id] = watts_per_device(rate) * self._devices
        self._prefilling = {rid for rid, rate in tokens_per_second_by_request.items() if rate > 0}
        self.set_own_watts(watts, now)

    def set_step_watts(self, watts_by_request: dict[str, float], now: float | None = None) -> None:
        """A step physics' dynamic watts per request for the coming step (replaces the
        previous step's; an empty dict ends it)."""
        self._advance(now)
        self._own_watts_nominal = {rid: float(w) for rid, w in watts_by_request.items() if w > 0}
        for request_id in self._own_watts_nominal:
            self._entry(request_id)
        self._recompute_load()

    def set_diffusion(self, request_id: str, megapixels: float, now: float | None = None) -> None:
        """A request denoises `megapixels` at once (0 when it stops)."""
        watts = self.power_model.diffusion_watts(megapixels) * self._devices
        self.set_own_watts({request_id: watts}, now)

    # -- readings -------------------------------------------------------------------------

    def power_watts(self, now: float | None = None) -> float:
        """Instantaneous group power (constant until the next work change)."""
        return self._power_watts

    def power_watts_by_device(self, now: float | None = None) -> dict[str, float]:
        per_device = self._power_watts / self._devices
        return {device: per_device for device in self.device_ids}

    def energy_joules(self, now: float | None = None) -> float:
        """Exact cumulative group energy since construction (no refresh, no offset)."""
        self._advance(now)
        return self._energy_joules

    def counter_sample(self, now: float | None = None) -> tuple[float, dict[str, float]]:
        """What a hardware counter shows: (time it last refreshed, joules per device)."""
        self._advance(now)
        if self.refresh_seconds > 0:
            timestamp, joules = self._snapshot_seconds, self._snapshot_joules
        else:
            timestamp, joules = self._last_seconds, self._energy_joules
        per_device = joules / self._devices + self.counter_offset_joules
        return timestamp, {device: per_device for device in self.device_ids}

    def energy_joules_by_device(self, now: float | None = None) -> dict[str, float]:
        """Cumulative joules per device as the counter shows them now."""
        return self.counter_sample(now)[1]

    @property
    def idle_joules(self) -> float:
        """Static energy drawn while no request was present, up to the clock's now."""
        self._advance(None)
        return self._idle_joules

    def idle_joules_at(self, now: float) -> float:
        self._advance(now)
        return self._idle_joules

    def ground_truth(self, request_id: str, now: float | None = None) -> RequestEnergy:
        """The exact energy this request caused so far; KeyError for an unknown id."""
        entry = self._ledger[request_id]
        self._advance(now)
        dynamic, static = entry
        if request_id in self._decoding:
            dynamic += self._decode_index_joules - self._decoding[request_id]
        if request_id in self._present:
            static += self._static_index_joules - self._present[request_id]
        return RequestEnergy(dynamic_joules=dynamic, static_joules=static)

    def ground_truth_joules(self, request_id: str, now: float | None = None) -> float:
        return self.ground_truth(request_id, now).total_joules

    def is_known(self, request_id: str) -> bool:
        """Whether this id has ever been seen (present or gone)."""
        return request_id in self._ledger

    def request_ids(self) -> list[str]:
        """Every request id the group has seen, present or gone."""
        return list(self._ledger)

    def attributed_joules(self, now: float | None = None) -> float:
        """Sum of every request's ground truth (energy minus idle energy)."""
        self._advance(now)
        return sum(self.ground_truth_joules(rid, now) for rid in self._ledger)
