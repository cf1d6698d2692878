"""SimGpu: exact integration, conservation of ground truth, the power model's shape."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sim import PowerModel, SimGpu, VirtualClock


def total_truth(gpu: SimGpu, now: float) -> float:
    return sum(gpu.ground_truth_joules(rid, now) for rid in gpu.request_ids())


def test_idle_group_draws_idle_power_and_it_is_idle_energy() -> None:
    clock = VirtualClock(100.0)
    gpu = SimGpu(["0", "1"], idle_power_watts=70.0, clock=clock)
    clock.advance(10.0)
    assert gpu.energy_joules() == pytest.approx(2 * 70.0 * 10.0)
    assert gpu.idle_joules == pytest.approx(1400.0)
    assert gpu.energy_joules_by_device() == {"0": pytest.approx(700.0), "1": pytest.approx(700.0)}
    assert gpu.power_watts() == 140.0


def test_static_power_is_shared_by_presence_time() -> None:
    clock = VirtualClock()
    gpu = SimGpu(idle_power_watts=100.0, clock=clock)
    gpu.request_arrived("a")
    clock.advance(2.0)  # a alone: 200 J
    gpu.request_arrived("b")
    clock.advance(2.0)  # a and b: 100 J each
    gpu.request_departed("a")
    clock.advance(1.0)  # b alone: 100 J
    gpu.request_departed("b")
    clock.advance(3.0)  # nobody: 300 J idle
    assert gpu.ground_truth("a").static_joules == pytest.approx(300.0)
    assert gpu.ground_truth("b").static_joules == pytest.approx(200.0)
    assert gpu.idle_joules == pytest.approx(300.0)
    assert gpu.energy_joules() == pytest.approx(800.0)


def test_decode_power_is_shared_equally_and_prefill_goes_to_its_owner() -> None:
    clock = VirtualClock()
    model = PowerModel(decode_watts_at_batch_1=50.0, decode_batch_exponent=0.5, prefill_joules_per_token=0.1)
    gpu = SimGpu(idle_power_watts=0.0, max_power_watts=10_000.0, power_model=model, clock=clock)
    for rid in ("a", "b", "c", "d"):
        gpu.request_arrived(rid)
    gpu.update_decode_batch(joined=["a", "b", "c", "d"])
    gpu.set_prefill_rates({"a": 1000.0})  # 100 W of prefill for a
    clock.advance(1.0)
    decode_watts = 50.0 * math.sqrt(4)  # 100 W for the batch of four
    assert gpu.power_watts() == pytest.approx(decode_watts + 100.0)
    assert gpu.ground_truth("a").dynamic_joules == pytest.approx(decode_watts / 4 + 100.0)
    assert gpu.ground_truth("b").dynamic_joules == pytest.approx(decode_watts / 4)


def test_decode_power_is_sublinear_in_batch_and_capped_at_the_board_limit() -> None:
    model = PowerModel()
    dynamic = [model.decode_watts(b) for b in (1, 2, 8, 64, 256)]
    assert dynamic == sorted(dynamic)
    assert model.decode_watts(8) < 8 * model.decode_watts(1)
    per_sequence = [model.decode_watts(b) / b for b in (1, 2, 8, 64, 256)]
    assert per_sequence == sorted(per_sequence, reverse=True)  # bigger batches: less energy per token
    clock = VirtualClock()
    gpu = SimGpu(idle_power_watts=70.0, max_power_watts=700.0, clock=clock)
    gpu.update_decode_batch(joined=[f"r{i}" for i in range(4096)])
    assert gpu.power_watts() == pytest.approx(700.0)


def test_counter_refreshes_like_nvml() -> None:
    clock = VirtualClock(0.0)
    gpu = SimGpu(idle_power_watts=100.0, clock=clock, refresh_seconds=0.1)
    clock.advance(0.05)
    assert gpu.energy_joules_by_device()["0"] == 0.0  # short windows read 0
    clock.advance(0.1)  # t = 0.15: counter shows t = 0.1
    timestamp, joules = gpu.counter_sample()
    assert timestamp == pytest.approx(0.1)
    assert joules["0"] == pytest.approx(10.0)
    gpu.update_decode_batch(joined=["x"])  # change power mid-window
    clock.advance(0.1)  # t = 0.25: counter shows t = 0.2 exactly
    power_after = gpu.power_watts()
    _, joules = gpu.counter_sample()
    assert joules["0"] == pytest.approx(15.0 + power_after * 0.05)
    assert gpu.energy_joules() == pytest.approx(15.0 + power_after * 0.1)


def test_noise_is_seeded() -> None:
    readings = []
    for _ in range(2):
        clock = VirtualClock()
        gpu = SimGpu(clock=clock, noise_fraction=0.05, seed=7)
        for batch in range(1, 20):
            gpu.update_decode_batch(joined=[f"r{batch}"])
            clock.advance(0.02)
        readings.append(gpu.energy_joules())
    assert readings[0] == readings[1]


def test_unknown_request_and_double_arrival_are_errors() -> None:
    gpu = SimGpu(clock=VirtualClock())
    with pytest.raises(KeyError):
        gpu.ground_truth_joules("nope")
    gpu.request_arrived("a")
    with pytest.raises(ValueError):
        gpu.request_arrived("a")


operations = st.lists(
    st.tuples(
        st.sampled_from(["arrive", "depart", "join", "leave", "prefill", "diffusion", "clear"]),
        st.integers(min_value=0, max_value=7),
        st.floats(min_value=0.0, max_value=2.0, allow_nan=False),
        st.floats(min_value=0.0, max_value=20_000.0, allow_nan=False),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=operations,
    devices=st.integers(min_value=1, max_value=4),
    refresh=st.sampled_from([0.0, 0.1]),
    noise=st.sampled_from([0.0, 0.1]),
)
def test_ground_truth_plus_idle_equals_measured_energy(
    ops: list[tuple[str, int, float, float]], devices: int, refresh: float, noise: float
) -> None:
    clock = VirtualClock(1000.0)
    gpu = SimGpu([str(d) for d in range(devices)], clock=clock, refresh_seconds=refresh, noise_fraction=noise, seed=3)
    last_counter = 0.0
    for op, who, dt, amount in ops:
        rid = f"r{who}"
        if op == "arrive" and not gpu.is_present(rid):
            gpu.request_arrived(rid)
        elif op == "depart":
            gpu.request_departed(rid)
        elif op == "join":
            gpu.update_decode_batch(joined=[rid])
        elif op == "leave":
            gpu.update_decode_batch(left=[rid])
        elif op == "prefill":
            gpu.set_prefill_rates({rid: amount})
        elif op == "diffusion":
            gpu.set_diffusion(rid, amount / 10_000.0)
        else:
            gpu.set_prefill_rates({})
        clock.advance(dt)
        now = clock()
        measured = gpu.energy_joules(now)
        accounted = total_truth(gpu, now) + gpu.idle_joules_at(now)
        assert accounted == pytest.approx(measured, rel=1e-9, abs=1e-9)
        assert gpu.power_watts() <= gpu.max_power_watts * devices + 1e-9
        counter = gpu.energy_joules_by_device(now)
        assert len(counter) == devices
        assert sum(counter.values()) <= measured + 1e-6
        assert sum(counter.values()) >= last_counter - 1e-9  # never decreases
        last_counter = sum(counter.values())
        for request_id in gpu.request_ids():
            energy = gpu.ground_truth(request_id, now)
            assert energy.dynamic_joules >= -1e-9 and energy.static_joules >= -1e-9
