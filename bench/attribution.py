"""Attribution accuracy: per-request energy against ground-truth simulations of several physics.

The sim (proxy.sim.physics) knows exactly what each request cost under DESIGN.md section
5's convention (Aumann-Shapley of the group's power in each request's work; static power
by presence), in a family of physics whose parameters are drawn per seed from published
H100/A100 ranges: additive prefill + decode power, one saturating curve of total work,
a hard power cap with throttling, and decode that costs more with context (KV reads).
The counter is realistic (proxy.sim.counter): 20-100 ms refresh with jitter, a few
percent noise, stale reads, stamped as the meters stamp a change (proxy.meters.counters),
read at the proxy's default `[meter] interval_ms`; or the DCGM
exporter's 1 s (report only). The proxy only sees what crosses the wire (arrival,
streamed tokens, end, final usage) and those readings; the real AttributionEngine runs
on exactly that, in virtual time (fast on 2 shared cores).

Each world: learning traffic, an idle gap (where the proxy restarts), scored traffic;
half the requests stream. Channels, each apart: the settled figure (receipt), the figure
at the end of the response (headers, end of stream), the same with [attribution]
settle_ms = 100 and the latency it adds, and the first 30 s of traffic after a restart
with the learned state reloaded and without (and the same requests scored without a
restart: what the restart itself costs). Baselines: each interval's measured energy
split equally among the requests in flight, or by the time each was present.
Conservation: |attributed + idle - measured| / measured.

Reports the median and p90 of |attributed - truth| / truth per channel, as the median
over seeds with the range, as one Markdown table; then each world against the goals.

    .venv/bin/python bench/attribution.py [--seeds 5] [--physics additive,curve] [--counters nvml-like,dcgm-1s]
    .venv/bin/python bench/attribution.py --proxy   # end to end over HTTP through the real proxy (real time)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

if TYPE_CHECKING:
    import aiohttp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.attribution import AttributionEngine  # noqa: E402
from proxy.config import MeterConfig  # noqa: E402
from proxy.meters.base import EnergySample  # noqa: E402
from proxy.meters.sim import SimMeter  # noqa: E402
from proxy.sim import SimGpu, SimModelConfig, VirtualClock, VirtualRequest, VirtualRun, run_virtual  # noqa: E402
from proxy.sim.counter import CounterSpec  # noqa: E402
from proxy.sim.physics import PHYSICS_NAMES, draw_physics  # noqa: E402

NOISE_FRACTION = 0.05
"""Proxy mode: each change of work draws power off by a few percent (clocks, temperature)."""
REFRESH_SECONDS = 0.1
"""Proxy mode and the exact counter: NVML's energy counter refreshes about every 100 ms."""
POLL_SECONDS = {
    "exact": MeterConfig().interval_ms / 1000,
    "nvml-like": MeterConfig().interval_ms / 1000,
    "dcgm-1s": tomllib.loads((ROOT / "deploy/kubernetes/overlays/dcgm/carbon-proxy.toml").read_text())["meter"]["interval_ms"] / 1000,
}
"""How often the proxy reads the counter: the default `[meter] interval_ms`, and what the
DCGM overlay in deploy/ sets for the exporter (not half the counter's refresh: the proxy
does not know it, so the bench may not either)."""
IDLE_LEAD_SECONDS = 3.0
"""The server idles before traffic starts, as a freshly started one does (idle learning)."""
GOALS = {True: (0.03, 0.10), False: (0.05, 0.15)}
"""(median, p90) error goals of issue #3: streaming, non-streaming."""


# -- workload -----------------------------------------------------------------------------


def log_uniform(rng: random.Random, low: float, high: float) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def make_requests(
    count: int,
    seed: int,
    *,
    rate_per_second: float = 2.5,
    swing_period_seconds: float = 30.0,
    prompt_range: tuple[int, int] = (50, 4000),
    output_range: tuple[int, int] = (10, 800),
    start_seconds: float = IDLE_LEAD_SECONDS,
) -> list[VirtualRequest]:
    """Poisson arrivals whose rate swings between 0.1x and 1.9x the mean (over
    `swing_period_seconds`), so the batch sweeps from a few sequences to ~60; prompt and
    output lengths log-uniform."""
    rng = random.Random(seed)
    peak = rate_per_second * 1.9
    requests: list[VirtualRequest] = []
    t = start_seconds
    while len(requests) < count:
        t += rng.expovariate(peak)  # thinning: accept with rate(t) / peak
        phase = 2 * math.pi * (t - start_seconds) / swing_period_seconds
        if rng.random() * peak > rate_per_second * (1.0 - 0.9 * math.cos(phase)):
            continue
        prompt = log_uniform(rng, *prompt_range)
        output = log_uniform(rng, *output_range)
        requests.append(VirtualRequest(f"r{len(requests)}", t, prompt, output))
    return requests


# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 1]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(slots=True)
class MethodResult:
    errors: list[float]
    conservation: float

    @property
    def median(self) -> float:
        return percentile(self.errors, 0.5)

    @property
    def p90(self) -> float:
        return percentile(self.errors, 0.9)

    @property
    def p99(self) -> float:
        return percentile(self.errors, 0.99)


@dataclass(slots=True)
class MixResult:
    mode: str
    mix: str
    streaming: bool
    methods: dict[str, MethodResult] = field(default_factory=dict)
    notes: str = ""


def relative_errors(attributed: dict[str, float], truth: dict[str, float]) -> list[float]:
    return [abs(attributed.get(rid, 0.0) - joules) / joules for rid, joules in truth.items() if joules > 0]


# -- baselines ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    request_id: str
    start: float
    end: float


def baselines(spans: Sequence[Span], samples: Sequence[tuple[float, float]]) -> dict[str, dict[str, float]]:
    """Equal split and time split of each interval's measured energy among the requests
    in flight in it (intervals with nobody in flight are idle, given to no one)."""
    equal: dict[str, float] = {s.request_id: 0.0 for s in spans}
    by_time: dict[str, float] = dict(equal)
    ordered = sorted(spans, key=lambda s: s.start)
    nxt = 0
    active: list[Span] = []
    last_t, last_j = samples[0]
    for t1, joules in samples[1:]:
        if t1 <= last_t:
            continue
        t0, energy = last_t, max(0.0, joules - last_j)
        last_t, last_j = t1, joules
        while nxt < len(ordered) and ordered[nxt].start < t1:
            active.append(ordered[nxt])
            nxt += 1
        active = [s for s in active if s.end > t0]
        members = [s for s in active if s.start < t1]
        if not members:
            continue
        each = energy / len(members)
        overlaps = [min(s.end, t1) - max(s.start, t0) for s in members]
        present = sum(overlaps)
        for span, overlap in zip(members, overlaps):
            equal[span.request_id] += each
            by_time[span.request_id] += energy * overlap / present if present > 0 else each
    return {"equal split": equal, "time split": by_time}


# -- virtual mode -------------------------------------------------------------------------

GAP_SECONDS = 5.0
"""Idle between the learning traffic and the scored traffic: where the proxy restarts."""
RESTART_WINDOW_SECONDS = 30.0
"""After a restart, requests arriving within this much traffic are scored apart."""


SETTLE_MS = 100.0
"""The [attribution] settle_ms the bench measures: a response's last bytes wait at most
this long for the meter reading that covers its end."""


@dataclass(slots=True)
class Replay:
    settled: dict[str, float]
    at_end: dict[str, float]
    """The figure at the end of the response (provisional), per request."""
    conservation: float
    state: dict | None = None
    at_end_settled: dict[str, float] = field(default_factory=dict)
    """The same figure with settle_ms = SETTLE_MS."""
    settle_waits: list[float] = field(default_factory=list)
    """Seconds each response's last bytes waited for it."""
    static: dict[str, float] = field(default_factory=dict)
    """The settled figure's static part (idle power by presence), per request."""


def replay_engine(
    run: VirtualRun,
    streamed: Callable[[str], bool],
    device_ids: Sequence[str],
    *,
    since: float = -math.inf,
    state: dict | None = None,
    prior: dict | None = None,
) -> Replay:
    """Feed a fresh engine what the proxy would see from `since` on (a proxy started
    then, with `state` loaded where given); returns its figures per request."""
    engine = AttributionEngine({"gpu": list(device_ids)}, prior=prior)
    if state is not None:
        engine.load_state(state)
    # (time, order at equal times, sequence, action, payload): opens, ticks and closes
    # at a sample's time happened before the counter refreshed there.
    events: list[tuple[float, int, int, object]] = []
    seq = 0
    for trace in run.traces:
        if trace.arrival_seconds < since:
            continue
        events.append((trace.arrival_seconds, 0, seq, ("open", trace)))
        if streamed(trace.request_id):
            for at in trace.token_seconds:
                seq += 1
                events.append((at, 1, seq, ("tick", trace)))
        events.append((trace.finished_seconds, 2, seq, ("close", trace)))
        seq += 1
    for timestamp, joules in run.samples:
        if timestamp >= since:
            events.append((timestamp, 3, seq, ("sample", joules)))
            seq += 1
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    usages = {}
    at_end: dict[str, float] = {}
    at_end_settled: dict[str, float] = {}
    waits: list[float] = []
    holding: list[tuple[str, float]] = []  # closed, waiting for a reading (settle_ms)
    settle = SETTLE_MS / 1000
    for at, _, _, (action, payload) in events:  # type: ignore[misc]
        if action == "sample":
            engine.on_sample(EnergySample(at, payload))  # type: ignore[arg-type]
            still = []
            for rid, closed in holding:
                if at - closed > settle:  # timed out: the predicted figure goes out
                    at_end_settled[rid] = at_end[rid]
                    waits.append(settle)
                elif at >= closed:
                    at_end_settled[rid] = engine.provisional(usages[rid], at)[0]
                    waits.append(at - closed)
                else:
                    still.append((rid, closed))
            holding = still
            continue
        trace = payload
        rid = trace.request_id  # type: ignore[attr-defined]
        if action == "open":
            usages[rid] = engine.open("gpu", at, streaming=streamed(rid), prompt_tokens_estimate=trace.prompt_tokens)  # type: ignore[attr-defined]
        elif action == "tick":
            usages[rid].tick(1, at)
        else:
            engine.close(usages[rid], at, prompt_tokens=trace.prompt_tokens, output_tokens=len(trace.token_seconds))  # type: ignore[attr-defined]
            at_end[rid] = engine.provisional(usages[rid], at)[0]
            holding.append((rid, at))
    not_final = [rid for rid, u in usages.items() if not u.final]
    if not_final:
        raise RuntimeError(f"{len(not_final)} requests never became final, e.g. {not_final[:3]}")
    totals = engine.totals()["gpu"]
    settled = {rid: u.energy_joules for rid, u in usages.items()}
    measured = totals.measured_joules
    conservation = abs(sum(settled.values()) + totals.idle_joules - measured) / measured
    for rid, _ in holding:
        at_end_settled[rid] = at_end[rid]
    static = {rid: u.static_joules for rid, u in usages.items()}
    return Replay(settled, at_end, conservation, engine.save_state(), at_end_settled, waits, static)


@dataclass(frozen=True, slots=True)
class World:
    """One member of the family, parameters drawn from the seed."""

    physics: str
    counter: str
    seed: int
    idle_watts: float
    board_watts: float
    gpu: SimGpu
    clock: VirtualClock
    counter_spec: CounterSpec | None


def make_world(physics: str, counter: str, seed: int) -> World:
    rng = random.Random(f"{physics}/{counter}/{seed}")
    if rng.random() < 0.5:
        board, idle = 700.0, rng.uniform(60.0, 100.0)  # H100 SXM
    else:
        board, idle = 400.0, rng.uniform(45.0, 65.0)  # A100 SXM
    clock = VirtualClock()
    drawn = draw_physics(physics, rng, idle_watts=idle, board_watts=board)
    gpu = SimGpu(clock=clock, idle_power_watts=idle, max_power_watts=board, physics=drawn, noise_fraction=0.02, seed=seed)
    spec = {"exact": None, "nvml-like": CounterSpec.draw(rng), "dcgm-1s": CounterSpec.coarse(rng)}[counter]
    return World(physics, counter, seed, idle, board, gpu, clock, spec)


@dataclass(slots=True)
class CaseResult:
    """One world's figures: per channel and kind, the relative errors."""

    world: str
    errors: dict[str, list[float]] = field(default_factory=dict)
    settle_waits: list[float] = field(default_factory=list)
    """'<channel>/<kind>' -> errors; channels: settled, end, equal, time, restart-with,
    restart-without, restart-with-end, restart-without-end; kinds: stream, plain."""
    conservation: float = 0.0


@dataclass(frozen=True, slots=True)
class Simulated:
    """One world's traffic run through the sim: what the proxy sees and the truth."""

    world: World
    run: VirtualRun
    gap_at: float
    """When the scored traffic starts (after the idle gap where the proxy restarts)."""
    streaming: dict[str, bool]
    """Per request: whether it streams (a coin, half of them)."""


def simulate(physics: str, counter: str, seed: int, warmup: int, count: int) -> Simulated:
    """Learning traffic, an idle gap, scored traffic, in the world the seed draws."""
    world = make_world(physics, counter, seed)
    first = make_requests(warmup, seed)
    gap_at = (first[-1].arrival_seconds if first else 0.0) + GAP_SECONDS + 20.0
    second = [
        VirtualRequest(f"r{warmup + i}", r.arrival_seconds + gap_at, r.prompt_tokens, r.output_tokens)
        for i, r in enumerate(make_requests(count, seed + 1000, start_seconds=0.0))
    ]
    run = run_virtual(
        first + second, SimModelConfig(), world.gpu, world.clock, sample_interval_seconds=POLL_SECONDS[counter],
        counter=world.counter_spec, counter_seed=seed, tail_seconds=3.0,
    )  # fmt: skip
    rng = random.Random(seed)
    streaming = {t.request_id: rng.random() < 0.5 for t in run.traces}
    return Simulated(world, run, gap_at, streaming)


def run_case(physics: str, counter: str, seed: int, warmup: int, count: int) -> CaseResult:
    """Learning traffic, an idle gap, scored traffic; half the requests stream. A warm
    engine replays all of it; restarted engines (with and without the state the warm
    one had at the gap) replay the scored part only."""
    simulated = simulate(physics, counter, seed, warmup, count)
    world, run, gap_at, streaming = simulated.world, simulated.run, simulated.gap_at, simulated.streaming
    streamed = streaming.__getitem__
    warm = replay_engine(run, streamed, world.gpu.device_ids)
    restart_at = gap_at - GAP_SECONDS
    # The state the warm engine had when the proxy restarted: a replay of the first part.
    first_only = VirtualRun([t for t in run.traces if t.finished_seconds < restart_at],
                            [s for s in run.samples if s[0] < restart_at], 0.0, 0.0)  # fmt: skip
    state = replay_engine(first_only, streamed, world.gpu.device_ids).state
    with_state = replay_engine(run, streamed, world.gpu.device_ids, since=restart_at, state=state)
    without = replay_engine(run, streamed, world.gpu.device_ids, since=restart_at)
    truth = {t.request_id: t.ground_truth.total_joules for t in run.traces}
    scored = [t for t in run.traces if t.arrival_seconds >= gap_at]
    early = [t for t in scored if t.arrival_seconds < gap_at + RESTART_WINDOW_SECONDS]
    samples = [(t, sum(j.values())) for t, j in run.samples]
    spans = [Span(t.request_id, t.arrival_seconds, t.finished_seconds) for t in run.traces]
    naive = baselines(spans, samples)
    result = CaseResult(f"{physics}/{counter}/{seed}", conservation=max(warm.conservation, with_state.conservation))
    result.settle_waits = warm.settle_waits
    figures = {
        "settled": (warm.settled, scored), "end": (warm.at_end, scored), "end-settle": (warm.at_end_settled, scored),
        "equal": (naive["equal split"], scored), "time": (naive["time split"], scored),
        "restart-with": (with_state.settled, early), "restart-with-end": (with_state.at_end, early),
        "restart-without": (without.settled, early), "restart-without-end": (without.at_end, early),
        "early": (warm.settled, early), "early-end": (warm.at_end, early),
    }  # fmt: skip
    for channel, (attributed, traces) in figures.items():
        for kind, want in (("stream", True), ("plain", False)):
            subset = {t.request_id: truth[t.request_id] for t in traces if streaming[t.request_id] == want}
            result.errors[f"{channel}/{kind}"] = relative_errors(attributed, subset)
    return result


def batch_note(spans: Sequence[Span], samples: Sequence[tuple[float, float]]) -> str:
    """Requests in flight per busy interval (p10/p50/p90), to show the load swept."""
    counts: list[float] = []
    for t, _ in samples[1::5]:
        n = sum(1 for s in spans if s.start <= t < s.end)
        if n:
            counts.append(n)
    return f"in flight p10/p50/p90 = {percentile(counts, 0.1):.0f}/{percentile(counts, 0.5):.0f}/{percentile(counts, 0.9):.0f}"


# -- proxy mode ---------------------------------------------------------------------------

PROXY_MODEL = SimModelConfig(natural_tokens_min=1000, natural_tokens_max=1000)
"""The virtual mode's server; replies run to max_tokens, so output lengths are ours."""
PROXY_RATE_PER_SECOND = 2.5
PROXY_OUTPUT_RANGE = (10, 400)
"""Shorter replies than the virtual mode's, so that real time stays short."""


class RecordingMeter(SimMeter):
    """The SimGpu's counter as the proxy reads it, each reading kept for the baselines."""

    def __init__(self, gpu: SimGpu) -> None:
        super().__init__(gpu)
        self.readings: list[tuple[float, float]] = []

    async def read(self) -> EnergySample:
        sample = await super().read()
        self.readings.append((sample.timestamp_seconds, sum(sample.joules_by_device.values())))
        return sample


@dataclass(slots=True)
class ProxyCall:
    request_id: str
    streaming: bool
    prompt_tokens: int
    output_tokens: int
    started: float = 0.0
    ended: float = 0.0
    ok: bool = False


async def _call(session: "aiohttp.ClientSession", url: str, call: ProxyCall) -> None:
    body: dict[str, object] = {
        "model": "sim-llm",
        "prompt": "abcd" * call.prompt_tokens,  # four bytes a token in the sim
        "max_tokens": call.output_tokens,
        "stream": call.streaming,
    }
    if call.streaming:
        body["stream_options"] = {"include_usage": True}
    call.started = time.monotonic()
    async with session.post(f"{url}/v1/completions", json=body, headers={"X-Request-Id": call.request_id}) as response:
        async for _ in response.content.iter_any():
            pass
        call.ok = response.status == 200
    call.ended = time.monotonic()


async def _traffic(session: "aiohttp.ClientSession", url: str, calls: list[ProxyCall], arrivals: list[float]) -> None:
    loop_start = time.monotonic()
    tasks = []
    for call, at in zip(calls, arrivals):
        await asyncio.sleep(max(0.0, loop_start + at - time.monotonic()))
        tasks.append(asyncio.create_task(_call(session, url, call)))
    await asyncio.gather(*tasks)


def _phase(prefix: str, count: int, seed: int, streaming: bool | None) -> tuple[list[ProxyCall], list[float]]:
    """Requests and arrival offsets; streaming None: a coin decides each."""
    rng = random.Random(seed)
    requests = make_requests(
        count, seed, rate_per_second=PROXY_RATE_PER_SECOND, swing_period_seconds=20.0,
        output_range=PROXY_OUTPUT_RANGE, start_seconds=0.0,
    )  # fmt: skip
    calls = [
        ProxyCall(f"{prefix}{i}", rng.random() < 0.5 if streaming is None else streaming, r.prompt_tokens, r.output_tokens)
        for i, r in enumerate(requests)
    ]
    return calls, [r.arrival_seconds for r in requests]


async def run_proxy_mixes(count: int, seed: int, warmup_seconds: float) -> list[MixResult]:
    """One proxy over HTTP in front of the sim server, both in this process on the same
    SimGpu: warmed with mixed traffic (learning), then a streaming and a non-streaming
    phase, each scored on its own requests from the final receipts."""
    import aiohttp

    from proxy.carbon.intensity import ConstantIntensity
    from proxy.config import config_from_dict
    from proxy.receipts.model import MemoryReceiptStore
    from proxy.serve import Service
    from proxy.sim import run_sim_server

    gpu = SimGpu(refresh_seconds=REFRESH_SECONDS, noise_fraction=NOISE_FRACTION, seed=seed)
    sim = await run_sim_server("127.0.0.1", 0, PROXY_MODEL, gpu)
    meter = RecordingMeter(gpu)
    config = config_from_dict({
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
        "upstreams": [{"name": "sim", "url": sim.url, "dialect": "openai"}],
        "carbon": {"intensity": 450, "pue": 1.2},
        "attribution": {"idle_power_watts": "auto", "prefill_weight": "auto"},
        "receipts": {"path": ":memory:"},
    })  # fmt: skip
    service = Service(config, meter=meter, intensity=ConstantIntensity(450), receipts=MemoryReceiptStore())
    await service.start()
    url = f"http://127.0.0.1:{service.public_port}"
    phases: list[tuple[str, bool | None, list[ProxyCall]]] = []
    try:
        await asyncio.sleep(2.0)  # idle first: idle power is learned (from 10 idle readings)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            # One arrival process, phase after phase without a pause (each phase's own
            # requests are scored; the few that overlap a neighbour's share its batch).
            warm = int(warmup_seconds * PROXY_RATE_PER_SECOND)
            all_calls: list[ProxyCall] = []
            all_arrivals: list[float] = []
            offset = 0.0
            for prefix, streaming, n in (("w", None, warm), ("s", True, count), ("n", False, count)):
                if n <= 0:
                    continue
                calls, arrivals = _phase(prefix, n, seed + len(phases), streaming)
                all_calls += calls
                all_arrivals += [offset + a for a in arrivals]
                offset += arrivals[-1] + 1.0 / PROXY_RATE_PER_SECOND
                phases.append((prefix, streaming, calls))
            await _traffic(session, url, all_calls, all_arrivals)
        await asyncio.sleep(3 * REFRESH_SECONDS)  # the meter covers the last ends
        receipts = {}
        deadline = time.monotonic() + 10.0
        every = [c for _, _, calls in phases for c in calls if c.ok]
        while time.monotonic() < deadline:
            for call in every:
                if call.request_id not in receipts:
                    receipt = await service.proxy.receipts.get(call.request_id)
                    if receipt is not None and receipt.status == "final":
                        receipts[call.request_id] = receipt
            if len(receipts) == len(every):
                break
            await asyncio.sleep(0.2)
        engine = service.proxy.accountant.engine  # type: ignore[union-attr]
        totals = next(iter(engine.totals().values()))
        learned = engine.costs_learned(next(iter(engine.group_names)))
        # From the receipts, as a caller sees them (every request final by now).
        receipted = math.fsum(r.device_energy_joules for r in receipts.values())
        conservation = abs(receipted + totals.idle_joules - totals.measured_joules) / totals.measured_joules
        truth_all = {c.request_id: gpu.ground_truth_joules(c.request_id) for c in every if gpu.is_known(c.request_id)}
    finally:
        await service.stop()
        await sim.close()
    spans = [Span(c.request_id, c.started, c.ended) for c in every]
    naive = baselines(spans, meter.readings)
    attributed = {rid: r.device_energy_joules for rid, r in receipts.items()}
    results: list[MixResult] = []
    for prefix, streaming, calls in phases:
        if streaming is None:
            continue
        truth = {c.request_id: truth_all[c.request_id] for c in calls if c.request_id in truth_all and c.request_id in receipts}
        result = MixResult("proxy", "streaming" if streaming else "non-streaming", streaming)
        result.methods["engine"] = MethodResult(relative_errors(attributed, truth), conservation)
        for name, split in naive.items():
            result.methods[name] = MethodResult(relative_errors(split, truth), 0.0)
        missing = sum(1 for c in calls if c.request_id not in truth)
        result.notes = batch_note([s for s in spans if s.request_id[0] == prefix], meter.readings)
        result.notes += (
            f"; a fresh proxy after {warmup_seconds:.0f} s of mixed warm-up traffic (costs learned by the end: {learned}; "
            "they take a minute or two to settle: --proxy-warmup-seconds 150 for steady state)"
        )
        if missing:
            result.notes += f"; {missing} requests failed or never settled (left out)"
        results.append(result)
    return results


# -- report -------------------------------------------------------------------------------

CHANNELS = (
    ("settled", "settled (receipt)"),
    ("end", "end of response"),
    ("end-settle", f"end of response, settle_ms = {SETTLE_MS:g}"),
    ("restart-with", "settled, first 30 s after a restart, state persisted"),
    ("restart-with-end", "end of response, first 30 s after a restart, state persisted"),
    ("restart-without", "settled, first 30 s after a restart, no state"),
    ("restart-without-end", "end of response, first 30 s after a restart, no state"),
    ("early", "settled, the same first 30 s, no restart"),
    ("early-end", "end of response, the same first 30 s, no restart"),
    ("equal", "equal split (naive)"),
    ("time", "elapsed-time split (naive)"),
)
GOAL_SETTLED = {"stream": (0.03, 0.10), "plain": (0.05, 0.15)}
GOAL_END = (0.05, 0.15)


def _spread(values: Sequence[float]) -> str:
    """Median across seeds, with the range."""
    if not values:
        return "-"
    mid = percentile(values, 0.5)
    if len(values) == 1:
        return f"{mid:.1%}"
    return f"{mid:.1%} ({min(values):.1%}-{max(values):.1%})"


def summarize(cases: Sequence[CaseResult]) -> tuple[str, list[str]]:
    """One Markdown table: per world (physics/counter) and channel, the median and p90
    error of streams and of non-streamed requests, each as the median over seeds (range);
    and the verdict lines against the goals."""
    by_world: dict[str, list[CaseResult]] = {}
    for case in cases:
        by_world.setdefault(case.world.rsplit("/", 1)[0], []).append(case)
    lines = [
        "| physics / counter | channel | streams median | streams p90 | non-streaming median | non-streaming p90 |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    verdicts: list[str] = []
    for world, runs in by_world.items():
        stat: dict[tuple[str, str, str], list[float]] = {}
        for case in runs:
            for key, errors in case.errors.items():
                channel, kind = key.split("/")
                if errors:
                    stat.setdefault((channel, kind, "median"), []).append(percentile(errors, 0.5))
                    stat.setdefault((channel, kind, "p90"), []).append(percentile(errors, 0.9))
        for channel, label in CHANNELS:
            cells = [_spread(stat.get((channel, kind, q), [])) for kind in ("stream", "plain") for q in ("median", "p90")]
            lines.append(f"| {world} | {label} | " + " | ".join(cells) + " |")
        conservation = max(c.conservation for c in runs)
        lines.append(f"| {world} | conservation (worst seed) | {conservation:.4%} | | | |")
        waits = [w for c in runs for w in c.settle_waits]
        lines.append(
            f"| {world} | latency added by settle_ms = {SETTLE_MS:g} (mean / p99) | "
            f"{1000 * math.fsum(waits) / max(1, len(waits)):.0f} ms | {1000 * percentile(waits, 0.99):.0f} ms | | |"
        )
        if world.endswith("dcgm-1s"):
            verdicts.append(f"{world}: report only (no goal with a 1 s counter)")
            continue
        misses = []
        for kind in ("stream", "plain"):
            med = lambda ch: percentile(stat.get((ch, kind, "median"), [math.nan]), 0.5)  # noqa: E731
            p90 = lambda ch: percentile(stat.get((ch, kind, "p90"), [math.nan]), 0.5)  # noqa: E731
            goal_med, goal_p90 = GOAL_SETTLED[kind]
            checks = [
                ("settled median", med("settled"), goal_med), ("settled p90", p90("settled"), goal_p90),
                ("end median", med("end"), GOAL_END[0]), ("end p90", p90("end"), GOAL_END[1]),
                ("restart settled median", med("restart-with"), goal_med), ("restart settled p90", p90("restart-with"), goal_p90),
                ("restart end median", med("restart-with-end"), GOAL_END[0]), ("restart end p90", p90("restart-with-end"), GOAL_END[1]),
            ]  # fmt: skip
            for name, value, goal in checks:
                if not value <= goal:
                    misses.append(f"{kind} {name} {value:.1%} > {goal:.0%}")
            naive = min(med("equal"), med("time"))
            if not med("settled") * 3 <= naive:
                misses.append(f"{kind} only {naive / med('settled'):.1f}x better than naive")
        if conservation > 0.001:
            misses.append(f"conservation {conservation:.3%}")
        verdicts.append(f"{world}: " + ("PASS" if not misses else "MISS: " + "; ".join(misses)))
    return "\n".join(lines), verdicts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--virtual", action="store_true", help="virtual-time replay (default when no mode is named)")
    parser.add_argument("--proxy", action="store_true", help="end to end through the real proxy over HTTP")
    parser.add_argument("--requests", type=int, default=300, help="scored requests per world (virtual mode)")
    parser.add_argument("--warmup", type=int, default=200, help="learning requests before the restart (virtual mode)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per world (virtual mode)")
    parser.add_argument("--physics", default=",".join(PHYSICS_NAMES), help="comma-separated physics (virtual mode)")
    parser.add_argument("--counters", default="nvml-like,dcgm-1s", help="comma-separated: exact, nvml-like, dcgm-1s")
    parser.add_argument("--proxy-requests", type=int, default=60, help="scored requests per mix in proxy mode")
    parser.add_argument("--proxy-warmup-seconds", type=float, default=40.0, help="mixed traffic before those (proxy mode)")
    parser.add_argument("--seed", type=int, default=1, help="first seed")
    args = parser.parse_args(argv)
    if not args.virtual and not args.proxy:
        args.virtual = True
    started = time.perf_counter()
    if args.virtual:
        cases = []
        for physics in args.physics.split(","):
            for counter in args.counters.split(","):
                if counter == "dcgm-1s" and physics not in ("additive", "curve"):
                    continue  # report-only rows: two physics are enough to show the 1 s counter
                for seed in range(args.seed, args.seed + args.seeds):
                    cases.append(run_case(physics, counter, seed, args.warmup, args.requests))
        text, verdicts = summarize(cases)
        print(text)
        print()
        print("\n".join(verdicts))
    if args.proxy:
        results = asyncio.run(run_proxy_mixes(args.proxy_requests, args.seed, args.proxy_warmup_seconds))
        print(table(results))
        print()
        for result in results:
            print(verdict(result))
    print(f"\n({time.perf_counter() - started:.1f} s)")
    return 0


def table(results: Iterable[MixResult]) -> str:
    lines = [
        "| mode | mix | method | requests | median err | p90 err | p99 err | conservation err |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        for name, method in result.methods.items():
            lines.append(
                f"| {result.mode} | {result.mix} | {name} | {len(method.errors)} | {method.median:.2%} | "
                f"{method.p90:.2%} | {method.p99:.2%} | {method.conservation:.4%} |"
            )
    return "\n".join(lines)


def verdict(result: MixResult) -> str:
    median_goal, p90_goal = GOALS[result.streaming]
    engine = result.methods["engine"]
    best_naive = min(m.median for name, m in result.methods.items() if name != "engine")
    ok = engine.median <= median_goal and engine.p90 <= p90_goal and engine.median * 3 <= best_naive
    ratio = best_naive / engine.median if engine.median > 0 else math.inf
    return (
        f"{result.mode}/{result.mix}: {'PASS' if ok else 'FAIL'} (goal median <= {median_goal:.0%}, p90 <= {p90_goal:.0%}, "
        f"3x better than naive; naive/engine median = {ratio:.1f}x; {result.notes})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
