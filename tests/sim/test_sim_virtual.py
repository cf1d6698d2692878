"""A workload in virtual time: wire events, meter samples and ground truth that add up."""

from __future__ import annotations

import random

import pytest

from proxy.sim import SimGpu, SimModelConfig, VirtualClock
from proxy.sim.virtual import VirtualRequest, run_virtual


def test_virtual_run_records_everything_and_conserves_energy() -> None:
    rng = random.Random(1)
    requests = [
        VirtualRequest(f"r{i}", rng.uniform(0, 5), rng.randint(10, 400), rng.randint(1, 120)) for i in range(300)
    ]
    clock = VirtualClock()
    gpu = SimGpu(["0", "1"], clock=clock, refresh_seconds=0.1)
    run = run_virtual(requests, SimModelConfig(max_batch=64), gpu, clock)
    assert len(run.traces) == 300
    for trace in run.traces:
        assert len(trace.token_seconds) == trace.output_tokens
        assert trace.arrival_seconds <= trace.token_seconds[0] <= trace.finished_seconds
        assert trace.token_seconds == sorted(trace.token_seconds)
        assert trace.ground_truth.static_joules > 0 and trace.ground_truth.dynamic_joules > 0
    attributed = sum(t.ground_truth.total_joules for t in run.traces)
    assert attributed + run.idle_joules == pytest.approx(run.energy_joules, rel=1e-9)
    times = [t for t, _ in run.samples]
    assert times == sorted(times) and times[-1] >= max(t.finished_seconds for t in run.traces)
    last_counter = sum(run.samples[-1][1].values())
    assert last_counter == pytest.approx(run.energy_joules, rel=0.02)  # within one refresh period
    # Longer answers cost more: ground truth follows the work.
    by_tokens = sorted(run.traces, key=lambda t: t.output_tokens)
    short = sum(t.ground_truth.dynamic_joules for t in by_tokens[:50])
    long = sum(t.ground_truth.dynamic_joules for t in by_tokens[-50:])
    assert long > 2 * short
