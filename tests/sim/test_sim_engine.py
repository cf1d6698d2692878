"""Continuous batching in virtual time: steps, queueing, cancellation, energy books."""

from __future__ import annotations

import pytest

from proxy.sim import SimGpu, SimModelConfig, VirtualClock
from proxy.sim.engine import BatchEngine, Phase, SimSequence, plan_output


class RecordingSink:
    def __init__(self) -> None:
        self.tokens: list[tuple[int, float]] = []
        self.finished = False

    def on_token(self, seq: SimSequence, position: int, index: int) -> None:
        self.tokens.append((position, 0.0))

    def on_finish(self, seq: SimSequence) -> None:
        self.finished = True


def run_until_idle(engine: BatchEngine, clock: VirtualClock, max_steps: int = 10_000) -> int:
    steps = 0
    while engine.has_work() and steps < max_steps:
        duration = engine.start_step(clock())
        if duration is None:
            break
        clock.advance(duration)
        engine.finish_step(clock())
        steps += 1
    return steps


def make(config: SimModelConfig) -> tuple[BatchEngine, SimGpu, VirtualClock]:
    clock = VirtualClock()
    gpu = SimGpu(clock=clock)
    return BatchEngine(config, gpu), gpu, clock


def submit(engine: BatchEngine, gpu: SimGpu, clock: VirtualClock, rid: str, prompt: int, target: int) -> SimSequence:
    seq = SimSequence(rid, prompt, target, "length", seed=hash(rid) & 0xFFFF, sink=RecordingSink())
    gpu.request_arrived(rid)
    engine.submit(seq, clock())
    return seq


def test_plan_output_says_length_only_when_the_cap_cuts() -> None:
    assert plan_output(50, 10) == (10, "length")
    assert plan_output(50, 50) == (50, "stop")
    assert plan_output(50, None) == (50, "stop")


def test_concurrent_sequences_share_decode_steps() -> None:
    config = SimModelConfig(tokens_per_second=50.0, prefill_seconds_per_token=0.0, batch_slowdown=0.0)
    engine, gpu, clock = make(config)
    seqs = [submit(engine, gpu, clock, f"r{i}", 10, 20) for i in range(4)]
    steps = run_until_idle(engine, clock)
    assert steps == 20  # one prefill step (first token) + 19 decode steps, all four together
    assert all(s.phase is Phase.FINISHED and s.generated_tokens == 20 for s in seqs)
    assert clock() == pytest.approx(19 / 50.0, rel=1e-3)
    assert all(len(s.sink.tokens) == 20 and s.sink.finished for s in seqs)  # type: ignore[union-attr]


def test_batch_limit_queues_and_slows_steps_mildly() -> None:
    config = SimModelConfig(tokens_per_second=100.0, max_batch=2, prefill_seconds_per_token=0.0, batch_slowdown=0.5)
    engine, gpu, clock = make(config)
    seqs = [submit(engine, gpu, clock, f"r{i}", 4, 5) for i in range(3)]
    engine.start_step(clock())
    assert engine.running_count == 2 and engine.waiting_count == 1
    clock.advance(0.01)
    engine.finish_step(clock())
    run_until_idle(engine, clock)
    assert all(s.generated_tokens == 5 for s in seqs)
    assert seqs[2].admitted_seconds is not None and seqs[2].admitted_seconds > seqs[0].admitted_seconds  # type: ignore[operator]
    assert config.decode_step_seconds(2) == pytest.approx(0.015)


def test_prefill_time_and_power_follow_prompt_tokens() -> None:
    config = SimModelConfig(prefill_seconds_per_token=0.001, max_prefill_tokens_per_step=100)
    engine, gpu, clock = make(config)
    seq = submit(engine, gpu, clock, "long", 250, 3)
    durations = []
    while seq.first_token_seconds is None:
        duration = engine.start_step(clock())
        assert duration is not None
        durations.append(duration)
        assert gpu.power_watts() == pytest.approx(70.0 + gpu.power_model.prefill_watts(1000.0))
        clock.advance(duration)
        engine.finish_step(clock())
    assert durations == pytest.approx([0.1, 0.1, 0.05])  # chunked prefill: 100 + 100 + 50 tokens
    run_until_idle(engine, clock)
    gpu.request_departed("long")
    truth = gpu.ground_truth("long")
    assert truth.dynamic_joules == pytest.approx(
        250 * gpu.power_model.prefill_joules_per_token
        + 2 * gpu.power_model.decode_watts(1) * config.decode_step_seconds(1)
    )


def test_cancel_frees_the_slot_and_keeps_the_work_done() -> None:
    config = SimModelConfig(tokens_per_second=100.0, max_batch=1, prefill_seconds_per_token=0.0)
    engine, gpu, clock = make(config)
    first = submit(engine, gpu, clock, "first", 4, 100)
    second = submit(engine, gpu, clock, "second", 4, 3)
    for _ in range(5):
        duration = engine.start_step(clock())
        clock.advance(duration or 0.0)
        engine.finish_step(clock())
    assert first.generated_tokens == 5 and second.phase is Phase.WAITING
    engine.cancel(first, clock())
    gpu.request_departed("first")
    assert first.cancelled and gpu.power_watts() == pytest.approx(70.0)
    run_until_idle(engine, clock)
    assert second.phase is Phase.FINISHED and first.generated_tokens == 5
    dynamic = gpu.ground_truth("first").dynamic_joules
    # 4 decode steps after the prefill step (which, at 0 s/token, lasts the 1 us minimum)
    assert dynamic == pytest.approx(4 * gpu.power_model.decode_watts(1) * 0.01, abs=1e-3)
    gpu.request_departed("second")
    now = clock()
    accounted = sum(gpu.ground_truth_joules(r, now) for r in gpu.request_ids()) + gpu.idle_joules_at(now)
    assert accounted == pytest.approx(gpu.energy_joules(now), rel=1e-12)


def test_embedding_sequences_only_prefill() -> None:
    engine, gpu, clock = make(SimModelConfig())
    seq = submit(engine, gpu, clock, "emb", 40, 0)
    run_until_idle(engine, clock)
    assert seq.phase is Phase.FINISHED and seq.generated_tokens == 0 and seq.first_token_seconds is None
