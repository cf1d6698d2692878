"""`carbon-proxy estimate`: what-if arithmetic, no proxy and no network.

    carbon-proxy estimate --gpus 4 --power-w 300 --hours 10 --pue 1.5 --intensity 450
prints 12 kWh raw, 18 kWh with PUE, 8.1 kg CO2e. Embodied carbon is off by default here
(the question is usually "what does this run cost in electricity"); --embodied adds it
as its own row and to the total.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import TextIO

import orjson

from proxy.carbon.embodied import DEFAULT_LIFETIME_YEARS, EmbodiedModel
from proxy.carbon.factory import parse_intensity_flag
from proxy.carbon.pue import resolve_pue
from proxy.carbon.sci import JOULES_PER_KWH, operational_grams
from proxy.errors import ConfigError

EXIT_USAGE = 2


@dataclass(frozen=True, slots=True)
class Estimate:
    gpus: int
    power_w: float
    hours: float
    pue: float
    pue_basis: str
    g_per_kwh: float
    intensity_source: str
    energy_kwh: float
    energy_with_pue_kwh: float
    operational_kg: float
    embodied_kg: float | None
    """None when embodied carbon is off."""
    device_model: str | None

    @property
    def total_kg(self) -> float:
        return self.operational_kg + (self.embodied_kg or 0.0)

    def as_dict(self) -> dict[str, object]:
        return {
            "gpus": self.gpus,
            "power_w": self.power_w,
            "hours": self.hours,
            "pue": self.pue,
            "pue_basis": self.pue_basis,
            "intensity_g_per_kwh": self.g_per_kwh,
            "intensity_source": self.intensity_source,
            "energy_kwh": self.energy_kwh,
            "energy_with_pue_kwh": self.energy_with_pue_kwh,
            "operational_kg_co2e": self.operational_kg,
            "embodied_kg_co2e": self.embodied_kg,
            "total_kg_co2e": self.total_kg,
            "device_model": self.device_model,
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=1, metavar="N", help="number of accelerators (default 1)")
    parser.add_argument("--power-w", type=float, required=True, metavar="W", help="average power per accelerator, watts")
    parser.add_argument("--hours", type=float, required=True, metavar="H", help="how long they run")
    parser.add_argument(
        "--pue", default=None, metavar="X",
        help="facility overhead: a number >= 1 or gcp|aws|azure|meta|average (default: the cloud's figure for a"
        " cloud-region zone, else 1.58, the Uptime Institute 2023 average)",
    )
    parser.add_argument(
        "--intensity", default="WORLD", metavar="NUMBER|ZONE",
        help="grid gCO2e/kWh, or a zone from the offline table: DEU, DE, gcp:europe-west4, aws:us-east-1 (default WORLD, 475)",
    )
    parser.add_argument(
        "--embodied", action=argparse.BooleanOptionalAction, default=False,
        help="add the hardware's embodied carbon (device + server share over its lifetime); default off",
    )
    parser.add_argument("--device-model", default="H100", metavar="MODEL", help="accelerator for --embodied (default H100)")
    parser.add_argument(
        "--lifetime-years", type=float, default=DEFAULT_LIFETIME_YEARS, metavar="Y",
        help=f"hardware lifetime for --embodied (default {DEFAULT_LIFETIME_YEARS:g})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _check(value: float, flag: str, *, minimum: float, inclusive: bool = True) -> float:
    ok = math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
    if not ok:
        raise ConfigError(flag, f"must be {'>=' if inclusive else '>'} {minimum:g}, got {value:g}")
    return value


def compute(args: argparse.Namespace) -> Estimate:
    """The estimate for parsed arguments; ConfigError (naming the flag) for bad values."""
    if args.gpus < 1:
        raise ConfigError("--gpus", f"must be a whole number >= 1, got {args.gpus}")
    power_w = _check(args.power_w, "--power-w", minimum=0.0, inclusive=False)
    hours = _check(args.hours, "--hours", minimum=0.0)
    provider = parse_intensity_flag(str(args.intensity))
    reading = provider.current()
    zone = None if reading.source == "constant" else reading.source.removeprefix("table:")
    pue, pue_basis = resolve_pue(args.pue, key="--pue", zone=zone)
    energy_joules = args.gpus * power_w * hours * 3600.0
    embodied_kg = None
    device_model = None
    if args.embodied:
        try:
            model = EmbodiedModel(args.device_model, lifetime_years=args.lifetime_years)
        except ConfigError as exc:  # name the flag, not the config key
            flag = "--" + exc.key.rsplit(".", 1)[-1].replace("_", "-")
            raise ConfigError(flag, exc.reason.split("; or set")[0]) from None
        device_model = model.device_model
        embodied_kg = model.grams_for(args.gpus * hours * 3600.0) / 1000.0
    return Estimate(
        gpus=args.gpus,
        power_w=power_w,
        hours=hours,
        pue=pue,
        pue_basis=pue_basis,
        g_per_kwh=reading.g_per_kwh,
        intensity_source=reading.source,
        energy_kwh=energy_joules / JOULES_PER_KWH,
        energy_with_pue_kwh=energy_joules / JOULES_PER_KWH * pue,
        operational_kg=operational_grams(energy_joules, pue, reading.g_per_kwh) / 1000.0,
        embodied_kg=embodied_kg,
        device_model=device_model,
    )


def fmt(value: float) -> str:
    """12.0 -> '12', 8.1 -> '8.1', 0.54357 -> '0.5436', 12345.6 -> '12,346'."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return f"{value:.4g}"


def render_table(est: Estimate) -> str:
    rows = [
        ("energy (raw)", f"{fmt(est.energy_kwh)} kWh"),
        (f"energy (PUE {est.pue:g})", f"{fmt(est.energy_with_pue_kwh)} kWh"),
        ("operational", f"{fmt(est.operational_kg)} kg CO2e"),
        ("embodied", "off (--embodied to add)" if est.embodied_kg is None else f"{fmt(est.embodied_kg)} kg CO2e ({est.device_model})"),
        ("total", f"{fmt(est.total_kg)} kg CO2e"),
    ]
    width = max(len(label) for label, _ in rows)
    head = (
        f"{est.gpus} x {fmt(est.power_w)} W x {fmt(est.hours)} h, PUE {est.pue:g}, "
        f"{fmt(est.g_per_kwh)} gCO2e/kWh ({est.intensity_source})"
    )
    return "\n".join([head, *(f"  {label:<{width}}  {value}" for label, value in rows)]) + "\n"


def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        est = compute(args)
    except ConfigError as exc:
        print(f"carbon-proxy estimate: {exc.key}: {exc.reason}", file=err)
        return EXIT_USAGE
    if args.json:
        out.write(orjson.dumps(est.as_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(render_table(est))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m proxy.carbon.calculator`), until the CLI wires it in."""
    parser = argparse.ArgumentParser(prog="carbon-proxy estimate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
