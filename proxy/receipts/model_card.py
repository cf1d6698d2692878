"""The `--format model-card` report: a Markdown "Environmental impact" section.

Hugging Face model cards carry an emissions section (hardware, hours, provider, region,
CO2e); this is its inference counterpart, built from measured receipts: period,
hardware, energy, CO2e, how the grid intensity was obtained, g per 1k tokens, SCI per
request, and the method with its limits, stated plainly so a reader can judge the figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from proxy.config import Config

if TYPE_CHECKING:
    from proxy.receipts.report import Report

JOULES_PER_KWH = 3.6e6


@dataclass(slots=True)
class Bases:
    """What the X-Emissions-Basis strings of the period say, weighted by energy."""

    meters: dict[str, float] = field(default_factory=dict)
    intensity_sources: dict[str, float] = field(default_factory=dict)
    pues: set[str] = field(default_factory=set)
    estimated_requests: int = 0
    stale_requests: int = 0
    marginal_requests: int = 0
    meter_down_requests: int = 0
    settled_at_restart: int = 0


def read_bases(bases: list[tuple[str, float, int]]) -> Bases:
    seen = Bases()
    for basis, joules, requests in bases:
        parts = dict(part.strip().partition("=")[::2] for part in basis.split(";") if "=" in part)
        if "meter" in parts:
            seen.meters[parts["meter"]] = seen.meters.get(parts["meter"], 0.0) + joules
        if "intensity" in parts:
            source = parts["intensity"]
            seen.intensity_sources[source] = seen.intensity_sources.get(source, 0.0) + joules
        if "pue" in parts:
            seen.pues.add(parts["pue"])
        seen.estimated_requests += requests if parts.get("method") == "estimated" else 0
        seen.stale_requests += requests if parts.get("stale") == "true" else 0
        seen.marginal_requests += requests if parts.get("marginal") == "true" else 0
        seen.meter_down_requests += requests if "meter_status" in parts else 0
        seen.settled_at_restart += requests if parts.get("settled") == "restart" else 0
    return seen


def grams(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value / 1000:.3g} kg"
    if abs(value) >= 0.1 or value == 0:
        return f"{value:.3g} g"
    return f"{value * 1000:.3g} mg"


def kwh(joules: float) -> str:
    value = joules / JOULES_PER_KWH
    return f"{value:.3g} kWh" if value >= 0.01 else f"{value * 1000:.3g} Wh"


def hardware(config: Config | None, upstreams: list[str]) -> str:
    if config is None:
        return "not recorded in receipts (run the report with --config to name it)"
    described = []
    for upstream in config.upstreams:
        if upstream.name in upstreams:
            model = upstream.device_model or config.carbon.get("device_model") or "the model the meter names"
            devices = f"{len(upstream.devices)} x {model}" if upstream.devices else f"{model} (all metered devices)"
            described.append(f"{devices} (upstream `{upstream.name}`)")
    return "; ".join(described) or "n/a"


def _shares(weights: dict[str, float]) -> str:
    total = sum(weights.values())
    if not weights:
        return "n/a"
    if len(weights) == 1 or total <= 0:
        return ", ".join(f"`{name}`" for name in weights)
    ranked = sorted(weights.items(), key=lambda kv: -kv[1])
    return ", ".join(f"`{name}` ({weight / total:.0%} of energy)" for name, weight in ranked)


def limits(report: Report, bases: Bases) -> list[str]:
    total = report.total
    items = [
        "Attribution is inferred from what crosses the wire (arrival, first byte, streamed chunks, token counts): "
        "the proxy cannot see inside the model server. Dynamic energy is split by work (prefill-weighted prompt tokens "
        "plus output tokens), static energy by time present; idle energy with nothing in flight is not in these figures.",
        "Grid intensity is location-based (average grid mix), never market-based: renewable energy certificates are not counted.",
        "Embodied carbon uses published per-device estimates amortised over an assumed lifetime; it is an estimate, not a measurement.",
    ]
    if not total.host_energy_joules:
        items.append("Host energy (CPU, memory, network) was not metered: only accelerator energy is included.")
    if bases.estimated_requests:
        items.append(f"{bases.estimated_requests} of {total.requests} requests used a modelled energy figure (method=estimated), not a measured one.")
    if bases.stale_requests:
        items.append(f"{bases.stale_requests} requests were priced with a stale or fallback grid intensity (live source unavailable).")
    if bases.marginal_requests:
        items.append(f"{bases.marginal_requests} requests used a marginal emissions signal rather than the average grid mix.")
    if bases.meter_down_requests:
        items.append(f"{bases.meter_down_requests} requests were served while the meter was starting or down; their energy is estimated from earlier power.")
    if bases.settled_at_restart:
        items.append(f"{bases.settled_at_restart} requests kept provisional figures because the proxy restarted before they settled.")
    if total.provisional:
        items.append(f"{total.provisional} request(s) were still provisional when this report was made.")
    return items


def write_model_card(report: Report, config: Config | None, out: TextIO) -> None:
    from proxy.receipts.report import format_period

    total = report.total
    bases = read_bases(report.bases)
    pue = ", ".join(sorted(bases.pues)) or "n/a"
    intensity = total.intensity_g_per_kwh
    lines = [
        "## Environmental impact (inference)",
        "",
        f"Measured per request by carbon-proxy over {total.requests} requests.",
        "",
        "| | |",
        "| --- | --- |",
        f"| Period | {format_period(report)} |",
        f"| Hardware | {hardware(config, report.upstreams)} |",
        f"| Energy | {kwh(total.energy_joules)} IT energy; {kwh(total.facility_energy_joules)} with PUE {pue} |",
        f"| Carbon emissions | {grams(total.co2e_grams)} CO2e: {grams(total.operational_grams)} operational, "
        f"{grams(total.embodied_grams)} embodied |",
        f"| Grid intensity | {'n/a' if intensity is None else f'{intensity:.0f} gCO2e/kWh'} (energy-weighted), "
        f"location-based; source: {_shares(bases.intensity_sources)} |",
        f"| Per 1k output tokens | {grams(total.grams_per_1k_output_tokens)} CO2e ({total.output_tokens} output tokens) |",
        f"| SCI per request | {grams(total.grams_per_request)} CO2e (ISO/IEC 21031:2024, R = one request) |",
        "",
        f"### By {report.by}",
        "",
        f"| {report.by} | requests | output tokens | energy | CO2e | per 1k tokens | per request |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in report.groups:
        lines.append(
            f"| {t.key} | {t.requests} | {t.output_tokens} | {kwh(t.energy_joules)} | {grams(t.co2e_grams)} | "
            f"{grams(t.grams_per_1k_output_tokens)} | {grams(t.grams_per_request)} |"
        )
    lines += [
        "",
        "### Method",
        "",
        f"- Energy: read from {_shares(bases.meters)} meter(s) at the accelerators and attributed to each request "
        "(carbon-proxy's attribution convention; conservation against the meter within 0.1%).",
        "- Operational emissions = energy x PUE x grid intensity of the interval the work ran in (gCO2e/kWh).",
        "- Embodied emissions = the hardware's embodied carbon x (time reserved / expected lifetime) x the request's share.",
        "- CO2e = operational + embodied (SCI, ISO/IEC 21031:2024); per 1k tokens counts output tokens.",
        "",
        "### Limits",
        "",
        *[f"- {item}" for item in limits(report, bases)],
        "",
    ]
    out.write("\n".join(lines))
