"""Embodied (manufacturing) carbon of accelerators, SCI's "M".

M = TE x (time reserved / expected lifetime) x (share of the resource). Per device:
TE = the device's own footprint + its share of the server it sits in (the GPU-less
server's footprint divided by the GPUs it holds). The per-request "time reserved" is
the device-seconds that attribution gives the request, by the same time shares as
static energy, so idle hardware is neither free nor charged twice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

from proxy.errors import ConfigError

SECONDS_PER_YEAR = 365.25 * 86400.0

DEFAULT_LIFETIME_YEARS = 4.0
"""Four years: Cloud Carbon Footprint's server lifespan (35,040 h). Accounting lives of 5-6
years exist, but accelerators are replaced sooner as each generation doubles perf/W;
a shorter life charges more embodied carbon per hour, the conservative side."""

DEFAULT_SERVER_KG = 2500.0
"""A GPU-less 8-GPU server (HPE Apollo 6500 Gen10 Plus) ~2,500 kgCO2e, as used in the BLOOM
paper (Luccioni et al. 2022). Published figures for such servers run ~2,500-5,700 kg."""

DEFAULT_GPUS_PER_SERVER = 8


@dataclass(frozen=True, slots=True)
class DeviceFootprint:
    model: str
    kg_co2e: float
    source: str
    estimate: bool
    """True when no manufacturer or peer-reviewed figure exists and the value is derived."""


_A100_KG, _A100_DIE_MM2 = 150.0, 826.0


def _by_die_area(model: str, die_mm2: float, die: str) -> DeviceFootprint:
    # Chip embodied carbon scales with wafer area; without a published figure, scale the
    # A100's by die area. Memory and board are ignored: these are order-of-magnitude.
    kg = round(_A100_KG * die_mm2 / _A100_DIE_MM2)
    return DeviceFootprint(
        model, float(kg),
        f"estimate: A100's 150 kg scaled by die area ({die} {die_mm2:g} mm2 / GA100 {_A100_DIE_MM2:g} mm2)", True,
    )


DEVICES: dict[str, DeviceFootprint] = {
    d.model: d
    for d in (
        DeviceFootprint("H100", 164.0, "NVIDIA HGX H100 product carbon footprint summary, per H100 80GB GPU", False),
        DeviceFootprint("H200", 164.0, "estimate: taken equal to H100 (same GH100 die and SXM board; extra HBM not counted)", True),
        DeviceFootprint("A100", _A100_KG, "Luccioni et al. 2022, 'Estimating the Carbon Footprint of BLOOM' (per-GPU figure, a lower bound)", False),
        _by_die_area("V100", 815.0, "GV100"),
        _by_die_area("L40S", 609.0, "AD102"),
        _by_die_area("L40", 609.0, "AD102"),
        _by_die_area("A10", 628.0, "GA102"),
        _by_die_area("A10G", 628.0, "GA102"),
        _by_die_area("L4", 294.0, "AD104"),
        _by_die_area("T4", 545.0, "TU104"),
    )
}


def find_device(name: str) -> DeviceFootprint | None:
    """The table row for 'H100', 'h100', or an NVML name like 'NVIDIA H100 80GB HBM3'.

    Matches whole tokens only, so 'L40S' is not read as 'L4' nor 'A100' as 'A10'."""
    for token in re.split(r"[^A-Z0-9]+", name.upper()):
        if token in DEVICES:
            return DEVICES[token]
    return None


def require_device(device_model: str, model_key: str, kg_key: str) -> DeviceFootprint:
    """The table row for `device_model`, or a config error naming `model_key` and the way out."""
    found = find_device(device_model)
    if found is None:
        raise ConfigError(model_key, f"no embodied figure for {device_model!r}; known: {', '.join(DEVICES)}; or set {kg_key}")
    return found


def resolve_device_model(configured: str | None, carbon_default: str | None, meter_names: Iterable[str | None]) -> str:
    """The device model of one upstream: its own `device_model`, else `[carbon]
    device_model`, else the model the meter names (NVML's name, DCGM's modelName) when
    every device names the same one the table knows, else H100 (the most deployed)."""
    if configured:
        return configured
    if carbon_default:
        return carbon_default
    found = {d.model if (d := find_device(name)) else None for name in meter_names if name}
    if len(found) == 1 and None not in found:
        return next(iter(found))
    return "H100"


def _positive(value: object, key: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(key, f"expected a number, got {value!r}")
    number = float(value)
    if number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return number


class EmbodiedModel:
    """Embodied grams per device-second of one accelerator model and its server share."""

    def __init__(
        self,
        device_model: str = "H100",
        lifetime_years: float = DEFAULT_LIFETIME_YEARS,
        server_kg: float = DEFAULT_SERVER_KG,
        gpus_per_server: int = DEFAULT_GPUS_PER_SERVER,
        *,
        device_kg: float | None = None,
        key_prefix: str = "carbon",
    ) -> None:
        if device_kg is None:
            self.device = require_device(device_model, f"{key_prefix}.device_model", f"{key_prefix}.device_kg")
        else:
            kg = _positive(device_kg, f"{key_prefix}.device_kg", allow_zero=True)
            self.device = DeviceFootprint(device_model, kg, "configured", False)
        self.lifetime_years = _positive(lifetime_years, f"{key_prefix}.lifetime_years")
        self.server_kg = _positive(server_kg, f"{key_prefix}.server_kg", allow_zero=True)
        if isinstance(gpus_per_server, bool) or not isinstance(gpus_per_server, int) or gpus_per_server < 1:
            raise ConfigError(f"{key_prefix}.gpus_per_server", f"expected a whole number >= 1, got {gpus_per_server!r}")
        self.gpus_per_server = gpus_per_server

    @property
    def device_model(self) -> str:
        return self.device.model

    @property
    def kg_per_device(self) -> float:
        """TE per device: its own footprint plus its share of the server."""
        return self.device.kg_co2e + self.server_kg / self.gpus_per_server

    @property
    def grams_per_device_second(self) -> float:
        return self.kg_per_device * 1000.0 / (self.lifetime_years * SECONDS_PER_YEAR)

    def grams_for(self, device_seconds: float) -> float:
        """M for `device_seconds` of reserved device time (e.g. 2 GPUs x 3 s = 6)."""
        return max(0.0, float(device_seconds)) * self.grams_per_device_second

    def describe(self) -> str:
        return (
            f"{self.device.model} {self.device.kg_co2e:g} kg + server {self.server_kg:g} kg / {self.gpus_per_server}"
            f" over {self.lifetime_years:g} y"
        )

    def __repr__(self) -> str:
        return f"EmbodiedModel({self.describe()})"
