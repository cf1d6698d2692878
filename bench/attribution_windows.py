"""Where the attribution error of bench/attribution.py lives, window by window.

The restart rows of bench/attribution.py score the first 30 s of traffic after a
restart. This diagnostic asks why they differ from the steady rows: it replays the same
worlds with the warm engine (no restart) and reports, per seed, the median |error| of
the settled figure in each 30 s window of the scored traffic (the first window is the
restart window), the signed error of its static part (idle power by presence) and of its
dynamic part, each over the request's true total, the mean number of requests in flight
at each request's midpoint, and the idle power learned against the truth.

If the first window is no worse than the later ones of the same seed, the restart rows
measure the seed, not the restart; if the error falls window after window, the cost
model is still converging; if the static part is off, idle power is.

    .venv/bin/python bench/attribution_windows.py [--physics additive] [--seeds 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.attribution import RESTART_WINDOW_SECONDS, replay_engine, simulate  # noqa: E402

WINDOWS = 4


def diagnose(physics: str, counter: str, seed: int, warmup: int, count: int) -> list[str]:
    """The same world and traffic as bench/attribution.py's run_case; one line per kind."""
    simulated = simulate(physics, counter, seed, warmup, count)
    world, run, gap_at, streaming = simulated.world, simulated.run, simulated.gap_at, simulated.streaming
    warm = replay_engine(run, streaming.__getitem__, world.gpu.device_ids)
    idle_chunks = sorted(warm.state["gpu"]["idle_watts"]) if warm.state else []
    learned_idle = idle_chunks[len(idle_chunks) // 2] if idle_chunks else float("nan")
    lines = []
    for kind, want in (("stream", True), ("plain", False)):
        cells = []
        for w in range(WINDOWS):
            low, high = gap_at + w * RESTART_WINDOW_SECONDS, gap_at + (w + 1) * RESTART_WINDOW_SECONDS
            traces = [t for t in run.traces if low <= t.arrival_seconds < high and streaming[t.request_id] == want]
            if not traces:
                cells.append("-")
                continue
            errors, static, dynamic, in_flight = [], [], [], []
            for t in traces:
                truth = t.ground_truth
                total = truth.total_joules
                errors.append(abs(warm.settled[t.request_id] - total) / total)
                static.append((warm.static[t.request_id] - truth.static_joules) / total)
                dynamic.append((warm.settled[t.request_id] - warm.static[t.request_id] - truth.dynamic_joules) / total)
                middle = (t.arrival_seconds + t.finished_seconds) / 2
                in_flight.append(sum(1 for u in run.traces if u.arrival_seconds <= middle <= u.finished_seconds))
            cells.append(
                f"{100 * statistics.median(errors):.1f}% (static {100 * statistics.median(static):+.1f}, "
                f"dynamic {100 * statistics.median(dynamic):+.1f}, in flight {statistics.mean(in_flight):.0f}, n {len(traces)})"
            )
        lines.append(f"| {physics}/{counter}/{seed} | {kind} | " + " | ".join(cells) + " |")
    lines.append(f"| {physics}/{counter}/{seed} | idle W learned / true | {learned_idle:.1f} / {world.idle_watts:.1f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--physics", default="additive", help="comma-separated physics")
    parser.add_argument("--counter", default="nvml-like")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1, help="first seed")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)
    heads = " | ".join(f"{w * 30}-{(w + 1) * 30} s" for w in range(WINDOWS))
    print(f"| world | kind | {heads} |")
    print("| --- | --- |" + " --- |" * WINDOWS)
    for physics in args.physics.split(","):
        for seed in range(args.seed, args.seed + args.seeds):
            print("\n".join(diagnose(physics, args.counter, seed, args.warmup, args.requests)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
