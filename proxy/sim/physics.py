"""A family of ground-truth physics for the batching engine, each with its exact per-request truth.

One engine step is one forward pass: some prompt tokens of admitted sequences (chunked
prefill) and one output token per decoding sequence. A physics turns a step's work into
its length and its dynamic energy, and splits that energy among the requests by the
convention of DESIGN.md section 5: Aumann-Shapley (AS) cost sharing of the group's power
as a function of each request's work (static power is shared by presence in SimGpu).

- `AdditivePhysics` (a): prefill power proportional to prompt tokens per second plus a
  decode power of the batch size. A separable sum, so each term is shared by its own
  users: a prompt token pays the prefill price, the batch's decode power is shared
  equally by its sequences (each made one token in the step).
- `CurvePhysics` (b): one concave curve of the step's total work rate,
  `P = P_sat * (1 - exp(-e0 * W / P_sat))` with `W = w_prefill * prompt tokens/s + output
  tokens/s`, saturating towards the board limit. Power depends on total work only, so
  AS gives every unit of work the same price: the split is proportional to work.
- `ThrottledPhysics` (c): (a) under a hard board-power cap. When a step would draw more
  than the cap, clocks drop: the step takes longer (tokens slow down) and, at the lower
  voltage, each operation costs a little less energy. AS of `min(cap, D(r))` along the
  path from no work: a prompt token pays its price up to where the path meets the cap,
  the batch shares the decode power it had there (decode is paid relatively more).
- `ContextPhysics` (d): (a) plus KV-cache reads: a decoding sequence's step reads its
  whole context, so it costs `e_kv * context` more (and the step lasts longer by
  `s_kv * total context`). The marginal cost of a sequence's decode token is
  `e_kv * its context` plus its share of the batch's weight streaming: exactly
  AS of the separable sum `decode(B) + sum_j e_kv * c_j * d_j` in each sequence's
  decode work d_j.

Parameters are drawn per run by `draw_physics` from ranges that published H100/A100
serving measurements support (see the comments there), never tuned to one point.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping, Protocol


@dataclass(frozen=True, slots=True)
class StepWork:
    """What one engine step does: prompt tokens processed per request, the context (tokens
    already in its KV cache) of each decoding sequence, and the step's nominal seconds."""

    prefill_tokens: Mapping[str, int]
    decode_contexts: Mapping[str, int]
    nominal_seconds: float


@dataclass(frozen=True, slots=True)
class StepCost:
    seconds: float
    """How long the step really lasts (a throttled step lasts longer)."""
    joules_by_request: dict[str, float]
    """Dynamic energy of the step per request (the AS truth); sums to the step's energy."""

    @property
    def joules(self) -> float:
        return math.fsum(self.joules_by_request.values())


class Physics(Protocol):
    name: str

    def step(self, work: StepWork, devices: int) -> StepCost: ...


@dataclass(frozen=True, slots=True)
class AdditivePhysics:
    """(a) prefill joules per prompt token + decode watts(batch) = w1 * batch ** exponent."""

    prefill_joules_per_token: float = 0.1
    decode_watts_at_batch_1: float = 50.0
    decode_batch_exponent: float = 0.45
    name: str = "additive"

    def step(self, work: StepWork, devices: int) -> StepCost:
        seconds = work.nominal_seconds
        shares = {rid: self.prefill_joules_per_token * n * devices for rid, n in work.prefill_tokens.items() if n > 0}
        batch = len(work.decode_contexts)
        if batch:
            each = self.decode_watts_at_batch_1 * batch**self.decode_batch_exponent * seconds * devices / batch
            for rid in work.decode_contexts:
                shares[rid] = shares.get(rid, 0.0) + each
        return StepCost(seconds, shares)


@dataclass(frozen=True, slots=True)
class CurvePhysics:
    """(b) P = P_sat (1 - exp(-e0 W / P_sat)), W = w_prefill * prompt/s + output/s."""

    prefill_weight: float = 0.1
    joules_per_unit_at_low_load: float = 1.0
    saturation_watts: float = 600.0
    name: str = "curve"

    def step(self, work: StepWork, devices: int) -> StepCost:
        seconds = work.nominal_seconds
        units = {rid: self.prefill_weight * n for rid, n in work.prefill_tokens.items() if n > 0}
        for rid in work.decode_contexts:
            units[rid] = units.get(rid, 0.0) + 1.0
        total = math.fsum(units.values())
        if total <= 0 or seconds <= 0:
            return StepCost(seconds, {})
        rate = total / seconds
        watts = self.saturation_watts * -math.expm1(-self.joules_per_unit_at_low_load * rate / self.saturation_watts)
        joules = watts * seconds * devices
        return StepCost(seconds, {rid: joules * u / total for rid, u in units.items()})


@dataclass(frozen=True, slots=True)
class ThrottledPhysics:
    """(c) `base` under a cap on dynamic watts per device. Power is min(cap, D(r)) of the
    requests' nominal work rates r; a capped step stretches (clocks drop) and its energy
    is the base energy x (cap / demand) ** dvfs_saving (lower voltage, cheaper operations).

    Truth: AS of min(cap, D) along t * r. Marginals are D's up to t*, where D(t* r) = cap,
    and 0 beyond, so a prompt token pays its price x t* and the batch shares
    decode_watts(t* x batch) equally; the step's real length multiplies both."""

    base: AdditivePhysics
    cap_watts: float
    dvfs_saving: float = 0.15
    name: str = "throttled"

    def step(self, work: StepWork, devices: int) -> StepCost:
        cost = self.base.step(work, devices)
        joules = cost.joules
        if cost.seconds <= 0 or joules <= 0:
            return cost
        demand_watts = joules / cost.seconds / devices
        if demand_watts <= self.cap_watts:
            return cost
        base = self.base
        prefill_watts = base.prefill_joules_per_token * sum(work.prefill_tokens.values()) / cost.seconds
        batch = len(work.decode_contexts)

        def demand(t: float) -> float:
            decode = base.decode_watts_at_batch_1 * (t * batch) ** base.decode_batch_exponent if batch else 0.0
            return prefill_watts * t + decode

        low, high = 0.0, 1.0
        for _ in range(60):  # bisection: demand is increasing in t
            mid = (low + high) / 2
            low, high = (mid, high) if demand(mid) < self.cap_watts else (low, mid)
        t_cap = (low + high) / 2
        throttled = joules * (self.cap_watts / demand_watts) ** self.dvfs_saving
        seconds = throttled / (self.cap_watts * devices)
        shares: dict[str, float] = {}
        for rid, n in work.prefill_tokens.items():
            if n > 0:
                shares[rid] = base.prefill_joules_per_token * n / cost.seconds * t_cap * seconds * devices
        if batch:
            each = base.decode_watts_at_batch_1 * (t_cap * batch) ** base.decode_batch_exponent / batch * seconds * devices
            for rid in work.decode_contexts:
                shares[rid] = shares.get(rid, 0.0) + each
        # The shares sum to cap x seconds up to the bisection's precision: make it exact.
        total = math.fsum(shares.values())
        return StepCost(seconds, {rid: j * throttled / total for rid, j in shares.items()})


@dataclass(frozen=True, slots=True)
class ContextPhysics:
    """(d) `base` plus KV-cache reads: e_kv joules and s_kv seconds per context token read."""

    base: AdditivePhysics
    kv_joules_per_context_token: float = 2e-5
    kv_seconds_per_context_token: float = 5e-8
    name: str = "context"

    def step(self, work: StepWork, devices: int) -> StepCost:
        context = sum(work.decode_contexts.values())
        seconds = work.nominal_seconds + self.kv_seconds_per_context_token * context
        cost = self.base.step(StepWork(work.prefill_tokens, work.decode_contexts, seconds), devices)
        shares = cost.joules_by_request
        for rid, tokens in work.decode_contexts.items():
            shares[rid] = shares.get(rid, 0.0) + self.kv_joules_per_context_token * tokens * devices
        return StepCost(seconds, shares)


PHYSICS_NAMES = ("additive", "curve", "throttled", "context")


def draw_physics(name: str, rng: random.Random, *, idle_watts: float, board_watts: float) -> Physics:
    """One physics of the family with parameters drawn from plausible ranges.

    Ranges (per device, an 8B-70B model on one H100 SXM (700 W board limit, 60-100 W
    idle) or A100 (400 W, 50-60 W idle)):
    - decode grows sublinearly with batch (exponent 0.3-0.55) to 25-50% of the dynamic
      range at batch 64 (150-300 W on an H100; 20-60 W at batch 1): memory bound (Samsi
      et al. 2023 "From Words to Watts"; Patel et al. 2024 "Characterizing Power
      Management Opportunities for LLMs in the Cloud"; Stojkovic et al. 2024 DynamoLLM);
    - prefill is compute bound and draws up to half the dynamic range at full speed:
      0.02-0.06 J per prompt token on an H100 for 7-13B models (Wilkins et al. 2024; Splitwise,
      Patel et al. 2024), i.e. a prompt token costs 0.05-0.3 of a decode token at
      moderate batch;
    - power caps at 55-85% of the dynamic range cost 5-30% in throughput (Patel et al.
      2024; Zeus, You et al. 2023): DVFS saves 10-30% energy per operation;
    - KV-cache reads: 128 KB per context token (8B, GQA) at ~3 TB/s and ~10 pJ/bit of
      HBM traffic: 1e-5 to 4e-5 J and 3e-8 to 8e-8 s per context token per step.
    Watts scale with the board's dynamic range (an A100 draws less than an H100), so
    that only (b) and (c) reach the board limit: the others stay additive.
    """
    dynamic_headroom = board_watts - idle_watts
    scale = dynamic_headroom / 620.0  # the ranges below are an H100's; an A100 draws less
    exponent = rng.uniform(0.3, 0.55)
    additive = AdditivePhysics(
        prefill_joules_per_token=rng.uniform(0.02, 0.06) * scale,
        decode_watts_at_batch_1=rng.uniform(0.25, 0.5) * dynamic_headroom / 64**exponent,
        decode_batch_exponent=exponent,
    )
    if name == "additive":
        return additive
    if name == "curve":
        return CurvePhysics(
            prefill_weight=rng.uniform(0.05, 0.3),
            # 40-120 W at batch 1 decoding 50 tokens/s: 0.8-2.4 J per unit at low load.
            joules_per_unit_at_low_load=rng.uniform(0.8, 2.0) * scale,
            saturation_watts=dynamic_headroom * rng.uniform(0.7, 1.0),
        )
    if name == "throttled":
        return ThrottledPhysics(additive, cap_watts=dynamic_headroom * rng.uniform(0.55, 0.85), dvfs_saving=rng.uniform(0.1, 0.3))
    if name == "context":
        return ContextPhysics(
            additive,
            kv_joules_per_context_token=rng.uniform(1e-5, 4e-5),
            kv_seconds_per_context_token=rng.uniform(3e-8, 8e-8),
        )
    raise ValueError(f"unknown physics {name!r}; one of {', '.join(PHYSICS_NAMES)}")
