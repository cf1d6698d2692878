"""The offline intensity table: countries and cloud regions, shipped with the package.

It is the floor every live provider falls back to, so it must never need the network.
Zones are ISO 3166 alpha-3 ("DEU"), alpha-2 ("DE"; also Electricity Maps style
sub-national zones like "US-CAL-CISO", which fall back to their country), cloud regions
("gcp:europe-west4", "aws:us-east-1", "azure:westeurope") or "WORLD".
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Mapping

from proxy.carbon.intensity import IntensityReading
from proxy.errors import ConfigError

WORLD_G_PER_KWH = 475.0
"""World average fallback (IEA 2019), the figure CodeCarbon also uses."""
WORLD_SOURCE = "IEA world average 2019 (475 gCO2e/kWh), as used by CodeCarbon"

CLOUD_PROVIDERS = ("gcp", "aws", "azure")

# Reserved or common alternatives for alpha-2 codes; each maps to exactly one country.
_ALPHA2_ALIASES = {"UK": "GB", "EL": "GR"}

_UNKNOWN_HINT = "use an ISO 3166 alpha-3 code or a cloud region like gcp:europe-west4"


@dataclass(frozen=True, slots=True)
class TableEntry:
    zone: str
    """Canonical zone as shown in the basis after 'table:': 'DEU', 'gcp:europe-west4', 'WORLD'."""
    g_per_kwh: float
    year: int | None
    """Year of the figure where the source states it."""
    source: str
    """Where the number comes from (publication or compilation)."""
    iso3: str | None
    """Country the zone lies in, when known."""
    name: str


@dataclass(frozen=True, slots=True)
class _Tables:
    countries: Mapping[str, TableEntry]
    alpha2: Mapping[str, str]
    regions: Mapping[str, TableEntry]


def _read_csv(name: str) -> list[dict[str, str]]:
    text = resources.files("proxy.carbon").joinpath("data", name).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


@lru_cache(maxsize=1)
def _tables() -> _Tables:
    countries: dict[str, TableEntry] = {}
    alpha2: dict[str, str] = {}
    for row in _read_csv("grid-intensity-countries.csv"):
        iso3 = row["iso3"].upper()
        countries[iso3] = TableEntry(
            zone=iso3,
            g_per_kwh=float(row["gco2e_per_kwh"]),
            year=int(row["year"]) if row["year"] else None,
            source=row["source"],
            iso3=iso3,
            name=row["country"],
        )
        alpha2[row["iso2"].upper()] = iso3
    regions: dict[str, TableEntry] = {}
    for row in _read_csv("cloud-regions.csv"):
        zone = f"{row['provider'].lower()}:{row['region'].lower()}"
        iso3 = row["iso3"].upper() or None
        if row["gco2e_per_kwh"]:
            g, year = float(row["gco2e_per_kwh"]), (int(row["year"]) if row["year"] else None)
        else:
            # No published region figure: the region takes its country's annual figure.
            country = countries[iso3] if iso3 else None
            if country is None:
                raise RuntimeError(f"cloud-regions.csv: {zone} names no known country")
            g, year = country.g_per_kwh, country.year
        regions[zone] = TableEntry(zone=zone, g_per_kwh=g, year=year, source=row["source"], iso3=iso3, name=row["city"])
    return _Tables(countries=countries, alpha2=alpha2, regions=regions)


def world_entry() -> TableEntry:
    return TableEntry(zone="WORLD", g_per_kwh=WORLD_G_PER_KWH, year=2019, source=WORLD_SOURCE, iso3=None, name="World")


def find_zone(zone: str) -> TableEntry | None:
    """The table entry for a zone, or None when the table does not know it."""
    text = zone.strip()
    if not text:
        return None
    tables = _tables()
    if ":" in text:
        provider, _, region = text.partition(":")
        return tables.regions.get(f"{provider.strip().lower()}:{region.strip().lower()}")
    upper = text.upper()
    if upper in ("WORLD", "WLD"):
        return world_entry()
    if len(upper) == 3 and upper in tables.countries:
        return tables.countries[upper]
    if len(upper) == 2:
        iso3 = tables.alpha2.get(_ALPHA2_ALIASES.get(upper, upper))
        return tables.countries[iso3] if iso3 else None
    return None


def lookup_zone(zone: str, *, key: str = "carbon.zone") -> TableEntry:
    """Like find_zone, but an unknown zone is a ConfigError naming `key`."""
    entry = find_zone(zone)
    if entry is None:
        raise ConfigError(key, f"unknown zone {zone.strip()!r}; {_UNKNOWN_HINT}")
    return entry


def country_for_zone(zone: str) -> str | None:
    """ISO alpha-3 for a provider's zone name: 'DE', 'US-CAL-CISO', 'DK-DK1', 'AUS-NSW', 'gcp:...'.

    Sub-national grid zones use the country's annual figure as their offline fallback:
    coarser than the live value, but the same grid mix on average.
    """
    entry = find_zone(zone)
    if entry is not None:
        return entry.iso3
    prefix = zone.strip().split("-", 1)[0]
    entry = find_zone(prefix) if prefix and prefix != zone.strip() else None
    return entry.iso3 if entry is not None else None


def known_zones() -> list[str]:
    """Every canonical zone the table knows, countries first."""
    tables = _tables()
    return sorted(tables.countries) + sorted(tables.regions) + ["WORLD"]


class TableIntensity:
    """A fixed intensity from the offline table. Never touches the network."""

    def __init__(self, zone: str, *, key: str = "carbon.zone") -> None:
        self.entry = lookup_zone(zone, key=key)
        self._reading = IntensityReading(g_per_kwh=self.entry.g_per_kwh, source=f"table:{self.entry.zone}")

    @classmethod
    def world(cls) -> "TableIntensity":
        return cls("WORLD")

    async def start(self) -> None:
        return None

    def current(self) -> IntensityReading:
        return self._reading

    def at(self, unix_seconds: float) -> IntensityReading:
        return self._reading

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"TableIntensity({self.entry.zone!r}, {self.entry.g_per_kwh:g} g/kWh)"
