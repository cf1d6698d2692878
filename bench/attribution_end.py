"""Where the end-of-response figure's error comes from (issue #12, item 3).

At a request's end its figure (engine.provisional) has three parts: (a) the intervals
already settled (final: its error is the settled figure's), (b) estimates for metered
intervals not settled yet (other members still running, or its own work not reported
when they were split), (c) the tail since the last meter reading, predicted. Once the
request is final, each part is compared with what the engine settled for the same
intervals, so end error = (a) settled - truth + (b) estimate - settled + (c) predicted
tail - settled tail. Prints per physics and kind the median and p90 of each part's
|error| / truth, the signed mean (bias), and the end error with (b) or (c) made exact.

    .venv/bin/python bench/attribution_end.py [--seeds 3] [--physics additive,throttled]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from attribution import GAP_SECONDS, RESTART_WINDOW_SECONDS, percentile, replay_engine, simulate  # noqa: E402

from proxy.attribution import AttributionEngine  # noqa: E402
from proxy.meters.base import EnergySample  # noqa: E402
from proxy.sim import VirtualRun  # noqa: E402
from proxy.sim.physics import PHYSICS_NAMES  # noqa: E402

PARTS = ("end", "settled", "estimate", "tail", "end if estimate exact", "end if tail exact")


def replay_parts(run: VirtualRun, streamed, device_ids, *, since: float = -math.inf, state: dict | None = None) -> dict[str, dict[str, float]]:
    """Per request: its end figure and the signed error of each part against what settled."""
    engine = AttributionEngine({"gpu": list(device_ids)})
    if state is not None:
        engine.load_state(state)
    at_close: dict[str, tuple[float, float, float, float]] = {}  # settled, estimate, tail, last sample t
    later: dict[str, list[float]] = {}  # settled dynamic of (b)'s intervals, of (c)'s
    settle = engine._settle

    def watched(group, interval):  # type: ignore[no-untyped-def]
        before = [u.dynamic_joules_final for u in interval.members]
        idle = settle(group, interval)
        for u, b in zip(interval.members, before):
            rid = u.owner
            if rid in at_close:
                later[rid][0 if interval.t1 <= at_close[rid][3] else 1] += u.dynamic_joules_final - b
        return idle

    engine._settle = watched  # type: ignore[method-assign]
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
    static_at_close: dict[str, float] = {}
    for at, _, _, (action, payload) in events:  # type: ignore[misc]
        if action == "sample":
            engine.on_sample(EnergySample(at, payload))  # type: ignore[arg-type]
            continue
        rid = payload.request_id  # type: ignore[attr-defined]
        if action == "open":
            usages[rid] = engine.open("gpu", at, streaming=streamed(rid), prompt_tokens_estimate=payload.prompt_tokens)  # type: ignore[attr-defined]
            usages[rid].owner = rid
        elif action == "tick":
            usages[rid].tick(1, at)
        else:
            u = usages[rid]
            engine.close(u, at, prompt_tokens=payload.prompt_tokens, output_tokens=len(payload.token_seconds))  # type: ignore[attr-defined]
            end = engine.provisional(u, at)[0]
            settled = u.static_joules + u.dynamic_joules_final
            at_close[rid] = (settled, u.dynamic_joules_estimate, end - settled - u.dynamic_joules_estimate, engine.last_sample_seconds("gpu"))
            static_at_close[rid] = u.static_joules
            later[rid] = [0.0, 0.0]
    out = {}
    for rid, (settled, estimate, tail, _) in at_close.items():
        u = usages[rid]
        tail_static = u.static_joules - static_at_close[rid]
        b_settled, c_settled = later[rid]
        out[rid] = {
            "final": u.energy_joules,
            "end": settled + estimate + tail,
            "estimate": estimate - b_settled,
            "tail": tail - (c_settled + tail_static),
        }
    return out


def run(physics: str, counter: str, seed: int, warmup: int, count: int, restart: bool) -> dict[str, list[float]]:
    simulated = simulate(physics, counter, seed, warmup, count)
    world, virtual, gap_at, streaming = simulated.world, simulated.run, simulated.gap_at, simulated.streaming
    if restart:
        restart_at = gap_at - GAP_SECONDS
        first_only = VirtualRun([t for t in virtual.traces if t.finished_seconds < restart_at],
                                [s for s in virtual.samples if s[0] < restart_at], 0.0, 0.0)  # fmt: skip
        state = replay_engine(first_only, streaming.__getitem__, world.gpu.device_ids).state
        parts = replay_parts(virtual, streaming.__getitem__, world.gpu.device_ids, since=restart_at, state=state)
        scored = [t for t in virtual.traces if gap_at <= t.arrival_seconds < gap_at + RESTART_WINDOW_SECONDS]
    else:
        parts = replay_parts(virtual, streaming.__getitem__, world.gpu.device_ids)
        scored = [t for t in virtual.traces if t.arrival_seconds >= gap_at]
    errors: dict[str, list[float]] = {}
    for trace in scored:
        truth = trace.ground_truth.total_joules
        p = parts.get(trace.request_id)
        if p is None or truth <= 0:
            continue
        kind = "stream" if streaming[trace.request_id] else "plain"
        signed = {
            "end": p["end"] - truth,
            "settled": p["final"] - truth,
            "estimate": p["estimate"],
            "tail": p["tail"],
            "end if estimate exact": p["end"] - p["estimate"] - truth,
            "end if tail exact": p["end"] - p["tail"] - truth,
        }
        for name, value in signed.items():
            errors.setdefault(f"{kind}/{name}", []).append(value / truth)
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--physics", default=",".join(PHYSICS_NAMES))
    parser.add_argument("--counter", default="nvml-like")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--restart", action="store_true", help="score the first 30 s after a restart (state reloaded)")
    args = parser.parse_args(argv)
    print("| physics | kind | part | median abs | p90 abs | mean signed |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for physics in args.physics.split(","):
        pooled: dict[str, list[list[float]]] = {}
        for seed in range(args.seed, args.seed + args.seeds):
            for key, values in run(physics, args.counter, seed, args.warmup, args.requests, args.restart).items():
                pooled.setdefault(key, []).append(values)
        for kind in ("stream", "plain"):
            for part in PARTS:
                runs = pooled.get(f"{kind}/{part}", [])
                med = percentile([percentile([abs(v) for v in r], 0.5) for r in runs], 0.5)
                p90 = percentile([percentile([abs(v) for v in r], 0.9) for r in runs], 0.5)
                bias = percentile([math.fsum(r) / len(r) for r in runs], 0.5)
                print(f"| {physics} | {kind} | {part} | {med:.1%} | {p90:.1%} | {bias:+.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
