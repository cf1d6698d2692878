"""Carbon-aware routing across three sites: the same request stream under each policy.

Three simulated model servers (proxy.routing.sim: the batching engine on a SimGpu, in
virtual time) of unequal efficiency in three zones whose intensity moves through the day
(proxy.carbon.traces), one day compressed into --day-seconds of virtual time:
- central  (DE: lignite/gas with a solar dip and wind swings), mid-efficiency, PUE 1.4
- california (US-CAL-CISO: the duck curve), the most efficient hardware, PUE 1.2
- nordic   (SE: hydro and nuclear), the least efficient hardware (slower, hungrier), PUE 1.1

Every policy sees the identical Poisson stream (same seed) through the real Router:
first, round_robin, least_in_flight and carbon (with its guards: exploration 2%, a
prefill-backlog limit). Reported per policy: grams as receipts would state them
(request grams) and for the whole fleet (idle energy and all embodied included),
IT energy, TTFT p50/p95, error rate (no first token within --timeout seconds), and
carbon against round_robin: the saving split into what came from cleaner grids, from
less energy (hardware efficiency and batching), from PUE and from embodied carbon (an
exact log-mean Divisia split of grams = energy x PUE x intensity, plus embodied), and
the predicted avoided grams of X-Carbon-Route next to the measured difference.

    python bench/routing.py                       # 5 runs (seeds), Markdown to stdout
    python bench/routing.py --runs 3 --day-seconds 600 --rate 6
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.routing.cost import PREFILL_WEIGHT  # noqa: E402
from proxy.routing.sim import FleetRun, FleetSite, request_stream, run_fleet  # noqa: E402
from proxy.sim.power import PowerModel  # noqa: E402

SITES = [
    FleetSite("central", "DE", tokens_per_second=45, idle_power_watts=75, max_power_watts=550,
              power=PowerModel(decode_watts_at_batch_1=70, prefill_joules_per_token=0.15), pue=1.4),
    FleetSite("california", "US-CAL-CISO", tokens_per_second=60, idle_power_watts=60, max_power_watts=700,
              power=PowerModel(), pue=1.2),
    FleetSite("nordic", "SE", tokens_per_second=30, idle_power_watts=90, max_power_watts=400,
              power=PowerModel(decode_watts_at_batch_1=90, prefill_joules_per_token=0.2), pue=1.1),
]
GUARDS = {"explore_share": 0.02, "max_queued_tokens": 1500}
POLICIES = {
    "first": {"policy": "first"},
    "round_robin": {"policy": "round_robin"},
    "least_in_flight": {"policy": "least_in_flight"},
    "carbon": {"policy": "carbon", "baseline": "round_robin", **GUARDS},
}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def site_rates(run: FleetRun) -> dict[str, float]:
    """Joules per work unit of each site over a run (work = prefill_weight x prompt + output)."""
    joules: dict[str, float] = {}
    work: dict[str, float] = {}
    for o in run.outcomes:
        joules[o.site] = joules.get(o.site, 0.0) + o.joules
        work[o.site] = work.get(o.site, 0.0) + _work(o.request.prompt_tokens, min(o.request.output_tokens, o.request.max_tokens or 10**9))
    return {site: joules[site] / work[site] for site in joules if work[site] > 0}


def _work(prompt_tokens: int, output_tokens: int) -> float:
    return PREFILL_WEIGHT * prompt_tokens + output_tokens


def summarize(run: FleetRun, timeout_seconds: float, reference_rates: dict[str, float] | None = None) -> dict[str, float]:
    ttft = [o.ttft_seconds for o in run.outcomes if o.ttft_seconds is not None]
    errors = sum(1 for o in run.outcomes if o.ttft_seconds is None or o.ttft_seconds > timeout_seconds)
    joules = sum(o.joules for o in run.outcomes)
    facility = sum(o.joules * o.pue for o in run.outcomes)
    operational = sum(o.operational_grams for o in run.outcomes)
    rates = reference_rates or site_rates(run)
    hardware = sum(rates.get(o.site, 0.0) * _work(o.request.prompt_tokens, min(o.request.output_tokens, o.request.max_tokens or 10**9))
                   for o in run.outcomes)
    return {
        "requests": len(run.outcomes),
        "joules": joules,
        "hardware_joules": hardware or joules,
        "facility_joules": facility,
        "operational_grams": operational,
        "embodied_grams": sum(o.embodied_grams for o in run.outcomes),
        "grams": operational + sum(o.embodied_grams for o in run.outcomes),
        "fleet_grams": run.fleet_operational_grams + run.fleet_embodied_grams,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p95": percentile(ttft, 95),
        "error_rate": errors / max(1, len(run.outcomes)),
        "predicted_avoided": sum(o.decision.avoided_grams for o in run.outcomes),
        **{f"share_{s.name}": run.per_site.get(s.name, 0) / max(1, len(run.outcomes)) for s in SITES},
    }


def _log_mean(a: float, b: float) -> float:
    if a <= 0 or b <= 0:
        return 0.0
    return a if math.isclose(a, b) else (a - b) / (math.log(a) - math.log(b))


def decompose(base: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """Saving (base - new) split exactly (LMDI-I: each factor's log change weighted by the
    log mean of the two operational totals), plus the embodied difference:

        operational grams = H x (E / H) x (F / E) x (O / F)

    H, "hardware": the energy the requests would have drawn at each site's joules per
    work unit under the baseline (so only where they ran changes it); E / H, "load": how
    much more or less each site drew per unit of work than under the baseline (fuller
    batches share static power among more requests); F / E the PUE; O / F the intensity."""
    weight = _log_mean(base["operational_grams"], new["operational_grams"])
    factors = {
        "hardware": (base["hardware_joules"], new["hardware_joules"]),
        "load": (base["joules"] / base["hardware_joules"], new["joules"] / new["hardware_joules"]),
        "pue": (base["facility_joules"] / base["joules"], new["facility_joules"] / new["joules"]),
        "grid": (base["operational_grams"] / base["facility_joules"], new["operational_grams"] / new["facility_joules"]),
    }
    parts = {name: weight * math.log(b / n) for name, (b, n) in factors.items()}
    parts["embodied"] = base["embodied_grams"] - new["embodied_grams"]
    return parts


def run_all(runs: int, day_seconds: float, rate: float, timeout_seconds: float) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in POLICIES}
    for seed in range(1, runs + 1):
        stream = request_stream(seconds=day_seconds, rate_per_second=rate, seed=seed)
        runs_by_policy = {name: run_fleet(stream, SITES, {**routing, "seed": seed}, day_seconds=day_seconds)
                          for name, routing in POLICIES.items()}
        reference = site_rates(runs_by_policy["round_robin"])  # every site's efficiency under an even load
        for name, run in runs_by_policy.items():
            results[name].append(summarize(run, timeout_seconds, reference))
    return results


def spread(values: list[float], fmt: str) -> str:
    """Mean, with the range across runs when there are several."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    runs = len(results["round_robin"])
    lines = [
        f"Routing bench: {runs} run(s), one day in {args.day_seconds:g} s of virtual time, "
        f"{args.rate:g} req/s Poisson, sites {', '.join(f'{s.name} ({s.zone})' for s in SITES)}; "
        "mean (min-max across runs).",
        "",
        "| policy | requests | IT energy kJ | request gCO2e | fleet gCO2e | TTFT p50 s | TTFT p95 s | errors "
        "| vs round_robin: grams | TTFT p95 | central / california / nordic |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = results["round_robin"]
    for name, rows in results.items():
        saving = [1 - r["grams"] / b["grams"] for r, b in zip(rows, base)]
        slower = [r["ttft_p95"] / b["ttft_p95"] - 1 for r, b in zip(rows, base)]
        shares = " / ".join(f"{statistics.fmean(r[f'share_{s.name}'] for r in rows):.0%}" for s in SITES)
        lines.append(
            f"| {name} | {statistics.fmean(r['requests'] for r in rows):.0f} | {spread([r['joules'] / 1e3 for r in rows], '.0f')} "
            f"| {spread([r['grams'] for r in rows], '.1f')} | {spread([r['fleet_grams'] for r in rows], '.1f')} "
            f"| {spread([r['ttft_p50'] for r in rows], '.3f')} | {spread([r['ttft_p95'] for r in rows], '.3f')} "
            f"| {spread([100 * r['error_rate'] for r in rows], '.1f')}% "
            f"| {spread([-100 * s for s in saving], '+.1f')}% | {spread([100 * s for s in slower], '+.1f')}% | {shares} |"
        )
    carbon = results["carbon"]
    parts = [decompose(b, c) for b, c in zip(base, carbon)]
    measured = [b["grams"] - c["grams"] for b, c in zip(base, carbon)]
    lines += [
        "",
        "Where carbon's saving against round_robin comes from (request grams; parts add up to the total):",
        "",
        "| part | gCO2e saved | share of the saving |",
        "| --- | --- | --- |",
    ]
    labels = {
        "grid": "cleaner grids (lower intensity where and when it ran)",
        "hardware": "hardware efficiency (sites' joules per token under an even load)",
        "load": "fuller batches (static power shared by more requests)",
        "pue": "lower PUE",
        "embodied": "embodied carbon",
    }
    for key, label in labels.items():
        lines.append(f"| {label} | {spread([p[key] for p in parts], '.1f')} "
                     f"| {spread([100 * p[key] / m for p, m in zip(parts, measured)], '.0f')}% |")
    lines.append(f"| total measured | {spread(measured, '.1f')} | 100% |")
    predicted = [c["predicted_avoided"] for c in carbon]
    lines += [
        "",
        f"Predicted avoided grams (sum of X-Carbon-Route, a counterfactual against a round_robin that never ran, "
        f"priced with carbon's own learned costs): {spread(predicted, '.1f')} g, against a measured difference of "
        f"{spread(measured, '.1f')} g between the two runs.",
        "",
        "Goals (issue 16): carbon vs round_robin TTFT p95 no more than 10% worse: "
        + ("met" if all(c["ttft_p95"] <= 1.10 * b["ttft_p95"] for b, c in zip(base, carbon)) else "MISSED")
        + " in every run; at least 25% fewer grams: "
        + ("met" if all(c["grams"] <= 0.75 * b["grams"] for b, c in zip(base, carbon)) else "MISSED")
        + " in every run.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs, each a different request stream (seed)")
    parser.add_argument("--day-seconds", type=float, default=1200.0, help="virtual seconds one simulated day lasts")
    parser.add_argument("--rate", type=float, default=6.0, help="requests per (virtual) second")
    parser.add_argument("--timeout", type=float, default=10.0, help="TTFT over this counts as an error (s)")
    args = parser.parse_args()
    started = time.perf_counter()
    results = run_all(args.runs, args.day_seconds, args.rate, args.timeout)
    print(report(results, args))
    print(f"\n({time.perf_counter() - started:.0f} s of real time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
