"""Power usage effectiveness: facility energy / IT energy. Defaults and their sources.

The default is deliberately the industry average rather than a hyperscaler figure:
an unknown site is more likely an ordinary data centre, and understating emissions is
the worse error for a carbon report. Cloud users should say which cloud (a preset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from proxy.errors import ConfigError

MIN_PUE = 1.0
MAX_PUE = 5.0
"""Above this is surely a typo (the worst surveyed sites are below 3)."""


@dataclass(frozen=True, slots=True)
class PuePreset:
    name: str
    pue: float
    source: str


PRESETS: dict[str, PuePreset] = {
    p.name: p
    for p in (
        PuePreset("average", 1.58, "Uptime Institute Global Data Center Survey 2023: average annual PUE 1.58"),
        PuePreset("gcp", 1.10, "Google Environmental Report 2023: fleet-wide trailing twelve-month PUE 1.10"),
        PuePreset("aws", 1.15, "Amazon Sustainability Report 2023: AWS global PUE 1.15 (Cloud Carbon Footprint uses 1.135)"),
        PuePreset("azure", 1.18, "Microsoft published datacenter fleet PUE ~1.18 (Cloud Carbon Footprint uses 1.185)"),
        PuePreset("meta", 1.08, "Meta Sustainability Report 2023: data centre fleet PUE ~1.08"),
        PuePreset("ideal", 1.0, "No facility overhead: reports IT energy only"),
    )
}

DEFAULT_PRESET = PRESETS["average"]
DEFAULT_PUE = DEFAULT_PRESET.pue


def validate_pue(value: object, *, key: str = "pue") -> float:
    """A number in [1.0, 5.0], else ConfigError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"expected a number >= {MIN_PUE:g} or one of {', '.join(PRESETS)}, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < MIN_PUE:
        raise ConfigError(key, f"PUE must be >= {MIN_PUE:g} (facility energy / IT energy), got {value!r}")
    if number > MAX_PUE:
        raise ConfigError(key, f"PUE {number:g} is implausible (surveyed data centres are below 3); expected <= {MAX_PUE:g}")
    return number


def preset_for_zone(zone: str | None) -> PuePreset:
    """The cloud's published PUE for a cloud-region zone ('gcp:europe-west4'), else the default."""
    if zone and ":" in zone:
        cloud = zone.split(":", 1)[0].strip().lower()
        if cloud in PRESETS:
            return PRESETS[cloud]
    return DEFAULT_PRESET


def resolve_pue(value: object, *, key: str = "pue", zone: str | None = None) -> tuple[float, str]:
    """(pue, why) from a configured number, a preset name, or nothing.

    Nothing configured: the cloud's own figure when the intensity zone is a cloud region,
    else the industry-average default.
    """
    if value is None or value == "":
        preset = preset_for_zone(zone)
        return preset.pue, f"default ({preset.source})"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PRESETS:
            return PRESETS[text].pue, PRESETS[text].source
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(key, f"expected a number >= {MIN_PUE:g} or one of {', '.join(PRESETS)}, got {value!r}") from None
        return validate_pue(number, key=key), "configured"
    return validate_pue(value, key=key), "configured"
