"""A whole workload through the batching engine in virtual time, with everything recorded.

For attribution-accuracy benchmarks: what crosses the wire (arrival, each token's time,
end), what the meter shows (counter samples at a fixed period), and the ground truth per
request, for thousands of requests in well under a second of real time.

    clock = VirtualClock()
    gpu = SimGpu(clock=clock, refresh_seconds=0.1)
    run = run_virtual([VirtualRequest("a", 0.0, 120, 40), ...], SimModelConfig(), gpu, clock)
    run.traces[0].token_seconds, run.traces[0].ground_truth.total_joules, run.samples
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Iterable

from proxy.sim.clock import VirtualClock
from proxy.sim.config import SimModelConfig
from proxy.sim.counter import CounterSpec, RealisticCounter
from proxy.sim.engine import BatchEngine, SimSequence
from proxy.sim.gpu import RequestEnergy, SimGpu


@dataclass(frozen=True, slots=True)
class VirtualRequest:
    request_id: str
    arrival_seconds: float
    prompt_tokens: int
    output_tokens: int


@dataclass(slots=True)
class VirtualTrace:
    request_id: str
    prompt_tokens: int
    output_tokens: int
    arrival_seconds: float
    token_seconds: list[float] = field(default_factory=list)
    """When each output token left the server (first token included)."""
    finished_seconds: float = 0.0
    ground_truth: RequestEnergy = RequestEnergy(0.0, 0.0)


@dataclass(slots=True)
class VirtualRun:
    traces: list[VirtualTrace]
    samples: list[tuple[float, dict[str, float]]]
    """Counter readings (timestamp the counter refreshed, joules per device) every period."""
    energy_joules: float
    idle_joules: float
    server: list[tuple[float, int, int, int]] = field(default_factory=list)
    """The server's own metrics at each poll: (time, prompt tokens processed, tokens
    generated, requests running), as vLLM's /metrics shows them."""


class _Recorder:
    __slots__ = ("trace", "clock")

    def __init__(self, trace: VirtualTrace, clock: VirtualClock) -> None:
        self.trace = trace
        self.clock = clock

    def on_token(self, seq: SimSequence, position: int, index: int) -> None:
        self.trace.token_seconds.append(self.clock())

    def on_finish(self, seq: SimSequence) -> None:
        self.trace.finished_seconds = self.clock()


def run_virtual(
    requests: Iterable[VirtualRequest],
    config: SimModelConfig,
    gpu: SimGpu,
    clock: VirtualClock,
    *,
    sample_interval_seconds: float = 0.1,
    tail_seconds: float = 1.0,
    counter: CounterSpec | None = None,
    counter_seed: int = 0,
) -> VirtualRun:
    """Serve every request (arrive, queue, prefill, decode, depart) and record it all.

    With `counter`, samples are what a realistic counter shows at each poll (jittered
    refresh, noise, stale reads, stamped at the poll that saw a change: counter.py);
    without, the SimGpu's own counter (refresh_seconds, exact)."""
    if gpu.now() != clock():
        raise ValueError("the SimGpu must run on the VirtualClock given here")
    if sample_interval_seconds <= 0:
        raise ValueError("sample_interval_seconds must be positive")
    pending = sorted(requests, key=lambda r: r.arrival_seconds)
    if pending and pending[0].arrival_seconds < clock():
        raise ValueError("a request arrives before the clock's current time")
    engine = BatchEngine(config, gpu)
    traces: list[VirtualTrace] = []
    samples: list[tuple[float, dict[str, float]]] = []
    server: list[tuple[float, int, int, int]] = []
    # Events: (time, order, kind, payload); kinds run in this order at equal times.
    events: list[tuple[float, int, int, object]] = []
    order = 0
    arrive, step_end, refresh, sample = 0, 1, 2, 3
    realistic = RealisticCounter(gpu, counter, counter_seed) if counter is not None else None
    if realistic is not None:
        heapq.heappush(events, (realistic.next_refresh_seconds, order, refresh, None))
        order += 1
    for request in pending:
        heapq.heappush(events, (request.arrival_seconds, order, arrive, request))
        order += 1
    heapq.heappush(events, (clock(), order, sample, None))
    stepping = False
    done_at = clock()
    arrivals_left = len(pending)

    def departed(seq: SimSequence) -> None:
        gpu.request_departed(seq.request_id)

    while events:
        at, _, kind, payload = heapq.heappop(events)
        if kind == sample and not stepping and not arrivals_left and at > done_at + tail_seconds:
            break
        clock.seconds = max(clock.seconds, at)
        if kind == arrive:
            request = payload
            assert isinstance(request, VirtualRequest)
            arrivals_left -= 1
            trace = VirtualTrace(request.request_id, request.prompt_tokens, request.output_tokens, at)
            traces.append(trace)
            gpu.request_arrived(request.request_id)
            seq = SimSequence(request.request_id, request.prompt_tokens, request.output_tokens, "length",
                              seed=order, sink=_Recorder(trace, clock))
            seq.on_done = departed
            engine.submit(seq, at)
        elif kind == step_end:
            engine.finish_step(at)
            stepping = False
            done_at = at
        elif kind == refresh:
            assert realistic is not None
            realistic.refresh(at)
            heapq.heappush(events, (realistic.next_refresh_seconds, order, refresh, None))
        else:
            samples.append(gpu.counter_sample(at) if realistic is None else realistic.read(at))
            server.append((at, engine.prompt_tokens_processed, engine.tokens_generated, engine.running_count))
            heapq.heappush(events, (at + sample_interval_seconds, order, sample, None))
        order += 1
        if not stepping:
            duration = engine.start_step(clock())
            if duration is not None:
                stepping = True
                heapq.heappush(events, (clock() + duration, order, step_end, None))
                order += 1
    now = clock()
    for trace in traces:
        trace.ground_truth = gpu.ground_truth(trace.request_id, now)
    return VirtualRun(traces, samples, gpu.energy_joules(now), gpu.idle_joules_at(now), server)
