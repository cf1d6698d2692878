"""The offline table: countries, alpha-2, cloud regions, world fallback, sources."""

from __future__ import annotations

import csv
from importlib import resources

import pytest

from proxy.carbon.table import WORLD_G_PER_KWH, TableIntensity, country_for_zone, find_zone, known_zones, lookup_zone
from proxy.errors import ConfigError


@pytest.mark.parametrize(
    ("zone", "canonical", "g_per_kwh"),
    [
        ("DEU", "DEU", 380.9), ("deu", "DEU", 380.9), ("DE", "DEU", 380.9), (" fr ", "FRA", 56.0),
        ("GB", "GBR", 237.6), ("UK", "GBR", 237.6), ("NA", "NAM", 59.3),
        ("gcp:europe-west4", "gcp:europe-west4", 236.0), ("GCP:Europe-West4", "gcp:europe-west4", 236.0),
        ("gcp:me-central1", "gcp:me-central1", 575.0),
        ("aws:us-east-1", "aws:us-east-1", 379.069), ("aws:eu-central-1", "aws:eu-central-1", 311.0),
        ("aws:eu-north-1", "aws:eu-north-1", 8.8), ("aws:eu-west-3", "aws:eu-west-3", 51.1),
        ("azure:westeurope", "azure:westeurope", 390.0),
        ("azure:francecentral", "azure:francecentral", 56.0),  # no published figure: France's
        ("WORLD", "WORLD", WORLD_G_PER_KWH),
    ],
)
def test_lookup(zone: str, canonical: str, g_per_kwh: float) -> None:
    entry = lookup_zone(zone)
    assert (entry.zone, entry.g_per_kwh) == (canonical, pytest.approx(g_per_kwh))
    assert entry.source


def test_world_fallback_is_475() -> None:
    reading = TableIntensity("WORLD").current()
    assert (reading.g_per_kwh, reading.source, reading.stale) == (475.0, "table:WORLD", False)


def test_table_provider_reading_and_basis() -> None:
    provider = TableIntensity("DE")
    assert provider.current().source == "table:DEU"
    assert provider.at(0).basis() == "intensity=table:DEU"


@pytest.mark.parametrize("zone", ["XX", "ZZZ", "gcp:mars-north1", "", "Germany", "aws:"])
def test_unknown_zone_names_the_key(zone: str) -> None:
    with pytest.raises(ConfigError) as info:
        lookup_zone(zone, key="carbon.zone")
    assert info.value.key == "carbon.zone"
    assert "use an ISO 3166 alpha-3 code or a cloud region like gcp:europe-west4" in info.value.reason
    assert find_zone(zone) is None


@pytest.mark.parametrize(
    ("zone", "iso3"),
    [("DE", "DEU"), ("US-CAL-CISO", "USA"), ("DK-DK1", "DNK"), ("AUS-NSW", "AUS"), ("gcp:us-east1", "USA"), ("CAISO_NORTH", None)],
)
def test_country_for_provider_zones(zone: str, iso3: str | None) -> None:
    assert country_for_zone(zone) == iso3


def test_every_row_has_a_source_and_countries_a_year() -> None:
    data = resources.files("proxy.carbon").joinpath("data")
    countries = list(csv.DictReader(data.joinpath("grid-intensity-countries.csv").open()))
    regions = list(csv.DictReader(data.joinpath("cloud-regions.csv").open()))
    assert len(countries) == 213 and all(r["source"] and r["year"] for r in countries)
    assert all(r["source"] for r in regions)
    assert {r["provider"] for r in regions} == {"gcp", "aws", "azure"}
    assert len({r["iso2"] for r in countries}) == len(countries)  # alpha-2 is unambiguous
    zones = known_zones()
    assert "gcp:europe-west4" in zones and "WORLD" in zones
    for zone in zones:
        assert lookup_zone(zone).zone == zone
