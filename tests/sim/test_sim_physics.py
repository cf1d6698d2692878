"""The family of ground-truth physics: each one's truth conserves energy and follows its
convention (DESIGN.md section 5) on steps whose answer is known by hand."""

from __future__ import annotations

import math
import random

import pytest

from proxy.sim import SimGpu, SimModelConfig, VirtualClock
from proxy.sim.counter import CounterSpec
from proxy.sim.physics import (
    PHYSICS_NAMES,
    AdditivePhysics,
    ContextPhysics,
    CurvePhysics,
    StepWork,
    ThrottledPhysics,
    draw_physics,
)
from proxy.sim.virtual import VirtualRequest, run_virtual


def _workload(seed: int, count: int = 200) -> list[VirtualRequest]:
    rng = random.Random(seed)
    return [VirtualRequest(f"r{i}", rng.uniform(0, 6), rng.randint(20, 3000), rng.randint(1, 200)) for i in range(count)]


@pytest.mark.parametrize("name", PHYSICS_NAMES)
@pytest.mark.parametrize("seed", [1, 2])
def test_each_physics_truth_conserves_energy(name: str, seed: int) -> None:
    rng = random.Random(seed)
    clock = VirtualClock()
    physics = draw_physics(name, rng, idle_watts=70.0, board_watts=700.0)
    gpu = SimGpu(["0", "1"], clock=clock, idle_power_watts=70.0, max_power_watts=700.0, physics=physics)
    run = run_virtual(_workload(seed), SimModelConfig(max_batch=64), gpu, clock, counter=CounterSpec.draw(rng), counter_seed=seed)
    assert all(len(t.token_seconds) == t.output_tokens for t in run.traces)
    attributed = sum(t.ground_truth.total_joules for t in run.traces)
    assert attributed + run.idle_joules == pytest.approx(run.energy_joules, rel=1e-9)
    assert all(t.ground_truth.dynamic_joules > 0 for t in run.traces)
    # The realistic counter is noisy per refresh, unbiased over the run.
    shown = sum(run.samples[-1][1].values())
    assert shown == pytest.approx(run.energy_joules, rel=0.03)


def test_additive_step_shares_prefill_by_tokens_and_decode_equally() -> None:
    physics = AdditivePhysics(prefill_joules_per_token=0.1, decode_watts_at_batch_1=50.0, decode_batch_exponent=0.5)
    cost = physics.step(StepWork({"p": 100}, {"a": 10, "b": 5000, "c": 7, "d": 1}, 0.04), devices=1)
    assert cost.joules_by_request["p"] == pytest.approx(10.0)
    assert cost.joules_by_request["a"] == pytest.approx(50.0 * 4**0.5 * 0.04 / 4)
    assert cost.joules_by_request["a"] == pytest.approx(cost.joules_by_request["b"])


def test_curve_every_unit_of_work_pays_the_same_price() -> None:
    physics = CurvePhysics(prefill_weight=0.2, joules_per_unit_at_low_load=1.5, saturation_watts=500.0)
    cost = physics.step(StepWork({"p": 200}, {"a": 10, "b": 20}, 0.05), devices=2)
    units = {"p": 40.0, "a": 1.0, "b": 1.0}
    rate = 42.0 / 0.05
    joules = 500.0 * (1 - math.exp(-1.5 * rate / 500.0)) * 0.05 * 2
    assert cost.joules == pytest.approx(joules)
    for rid, u in units.items():
        assert cost.joules_by_request[rid] == pytest.approx(joules * u / 42.0)
    # Saturation: twice the work costs less than twice the energy.
    double = physics.step(StepWork({"p": 400}, {"a": 10, "b": 20, "c": 1, "d": 1}, 0.05), devices=2)
    assert double.joules < 2 * cost.joules


def test_throttled_step_stretches_to_the_cap_and_shares_by_the_capped_path() -> None:
    base = AdditivePhysics(prefill_joules_per_token=0.1, decode_watts_at_batch_1=100.0, decode_batch_exponent=0.5)
    physics = ThrottledPhysics(base, cap_watts=300.0, dvfs_saving=0.2)
    work = StepWork({"p": 200}, {"a": 10, "b": 20, "c": 30, "d": 40}, 0.04)
    free = base.step(work, devices=1)
    demand = free.joules / 0.04  # 500 W prefill + 200 W decode
    capped = physics.step(work, devices=1)
    assert capped.seconds > 0.04
    assert capped.joules == pytest.approx(300.0 * capped.seconds)
    assert capped.joules == pytest.approx(free.joules * (300.0 / demand) ** 0.2)
    # On the path t x work, the cap is met at t* with 500 t + 100 (4 t) ** 0.5 = 300.
    t = ((-200 + (200**2 + 4 * 500 * 300) ** 0.5) / (2 * 500)) ** 2
    assert 500 * t + 100 * (4 * t) ** 0.5 == pytest.approx(300.0)
    prefill_watts = 500 * t
    assert capped.joules_by_request["p"] == pytest.approx(prefill_watts * capped.seconds, rel=1e-6)
    assert capped.joules_by_request["a"] == pytest.approx(capped.joules_by_request["d"])
    # Under the cap the same step is not throttled.
    light = StepWork({}, {"a": 10}, 0.02)
    assert physics.step(light, devices=1) == base.step(light, devices=1)


def test_context_decode_token_pays_for_the_context_it_reads() -> None:
    base = AdditivePhysics(prefill_joules_per_token=0.1, decode_watts_at_batch_1=50.0, decode_batch_exponent=0.5)
    physics = ContextPhysics(base, kv_joules_per_context_token=2e-5, kv_seconds_per_context_token=1e-7)
    cost = physics.step(StepWork({}, {"short": 100, "long": 8100}, 0.02), devices=1)
    seconds = 0.02 + 1e-7 * 8200
    assert cost.seconds == pytest.approx(seconds)
    each = 50.0 * 2**0.5 * seconds / 2
    assert cost.joules_by_request["short"] == pytest.approx(each + 2e-5 * 100)
    assert cost.joules_by_request["long"] - cost.joules_by_request["short"] == pytest.approx(2e-5 * 8000)


def test_the_server_counts_its_prompt_and_generated_tokens_as_vllm_does() -> None:
    clock = VirtualClock()
    gpu = SimGpu(clock=clock, physics=AdditivePhysics())
    requests = _workload(5, count=60)
    run = run_virtual(requests, SimModelConfig(max_batch=16), gpu, clock)
    times = [at for at, *_ in run.server]
    prompts = [p for _, p, _, _ in run.server]
    assert times == sorted(times) and prompts == sorted(prompts)  # counters only grow
    _, prompt_total, generated_total, running = run.server[-1]
    assert prompt_total == sum(r.prompt_tokens for r in requests)
    assert generated_total == sum(r.output_tokens for r in requests) and running == 0
    assert any(0 < n < 16 for *_, n in run.server)  # vllm:num_requests_running while busy
