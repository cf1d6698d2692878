"""SCI arithmetic, intervals across data-point boundaries, embodied carbon and PUE."""

from __future__ import annotations

import math
import time

import pytest

from carbon_fakes import FAST, FakeApi, Reply, running
from carbon_recorded import ca_bylocation
from proxy.carbon.embodied import DEVICES, SECONDS_PER_YEAR, EmbodiedModel, find_device
from proxy.carbon.intensity import ConstantIntensity, IntensityReading
from proxy.carbon.providers import CarbonAwareSdkProvider
from proxy.carbon.pue import DEFAULT_PUE, PRESETS, resolve_pue, validate_pue
from proxy.carbon.sci import (
    emissions,
    emissions_over_intervals,
    operational_grams,
    per_image,
    sci_per_1k_tokens,
)
from proxy.carbon.table import TableIntensity
from proxy.errors import ConfigError

TEN_HOURS = 10 * 3600.0
WORKED_JOULES = 4 * 300.0 * TEN_HOURS  # 4 GPUs x 0.3 kW x 10 h = 12 kWh


def test_worked_example_through_the_per_request_path() -> None:
    start = 1_700_000_000.0
    # A 10-hour "request" on 4 GPUs, reported as one-second intervals as attribution would.
    per_second = WORKED_JOULES / TEN_HOURS
    segments = [(start + i, start + i + 1, per_second) for i in range(int(TEN_HOURS))]
    result = emissions_over_intervals(segments, 1.5, ConstantIntensity(450))
    assert result.energy_joules / 3.6e6 == pytest.approx(12.0)
    assert result.energy_joules / 3.6e6 * result.pue == pytest.approx(18.0)
    assert result.operational_grams == pytest.approx(8100.0)
    assert result.total_grams == pytest.approx(8100.0)
    assert result.basis() == "intensity=constant; pue=1.5"
    single = emissions(WORKED_JOULES, 1.5, ConstantIntensity(450).current(), embodied_grams=543.6)
    assert single.operational_grams == pytest.approx(8100.0) and single.total_grams == pytest.approx(8643.6)


def test_operational_grams_and_per_unit_figures() -> None:
    assert operational_grams(3.6e6, 1.0, 400) == 400
    assert operational_grams(3.6e6, 1.2, 400) == pytest.approx(480)
    assert sci_per_1k_tokens(2.0, 500) == 4.0 and sci_per_1k_tokens(2.0, 0) is None
    assert per_image(3.0, 4) == 0.75 and per_image(3.0, 0) is None
    e = emissions(3.6e6, 1.0, IntensityReading(100, "constant"), embodied_grams=20)
    assert (e.per_1k_output_tokens(100), e.per_image(2)) == (1200.0, 60.0)
    assert e.as_dict()["co2e_grams"] == 120


class TwoValues:
    """100 g/kWh before t=1000, 300 after; no change_points, so only midpoints are seen."""

    def at(self, unix_seconds: float) -> IntensityReading:
        return IntensityReading(100.0 if unix_seconds < 1000 else 300.0, "fake", valid_from_unix=0 if unix_seconds < 1000 else 1000)

    def current(self) -> IntensityReading:
        return self.at(2000)


class TwoValuesWithBoundary(TwoValues):
    def change_points(self, t0: float, t1: float) -> list[float]:
        return [1000.0] if t0 < 1000 < t1 else []


def test_a_stream_across_a_boundary_uses_both_values() -> None:
    kwh = 3.6e6
    # Fine intervals: each priced at its own time.
    fine = emissions_over_intervals([(900, 1000, kwh), (1000, 1100, kwh)], 1.0, TwoValues())
    assert fine.operational_grams == pytest.approx(400.0)
    assert fine.g_per_kwh == pytest.approx(200.0)
    # One coarse interval spanning the boundary: split by time when the provider says where.
    coarse = emissions_over_intervals([(900, 1100, 2 * kwh)], 1.0, TwoValuesWithBoundary())
    assert coarse.operational_grams == pytest.approx(400.0)
    assert coarse.g_per_kwh == pytest.approx(200.0)


async def test_at_across_a_live_data_point_boundary(fake_api: FakeApi) -> None:
    now = time.time()
    boundary = now - 300
    fake_api.script("/emissions/bylocation", Reply(json=ca_bylocation("eastus", [(now - 600, 100.0), (boundary, 300.0)])))
    provider = CarbonAwareSdkProvider("eastus", base_url=fake_api.url, fallback=TableIntensity("azure:eastus"), **FAST)
    async with running(provider):
        assert provider.at(boundary - 1).g_per_kwh == 100.0
        assert provider.at(boundary + 1).g_per_kwh == 300.0
        assert provider.at(boundary + 1).valid_from_unix == pytest.approx(boundary, abs=1e-3)
        # A long stream from 200 s before to 200 s after the boundary, one coarse segment.
        result = emissions_over_intervals([(boundary - 200, boundary + 200, 7.2e6)], 1.0, provider)
        assert result.operational_grams == pytest.approx(1.0 * 100 + 1.0 * 300)
        assert result.intensity.source == "carbonaware:eastus"


def test_mixed_sources_are_all_named_and_flags_kept() -> None:
    class Mixed:
        def at(self, t: float) -> IntensityReading:
            if t < 10:
                return IntensityReading(200, "electricitymaps:DE")
            return IntensityReading(380.9, "table:DEU", stale=True)

        def current(self) -> IntensityReading:
            return self.at(20)

    result = emissions_over_intervals([(0, 10, 1.0), (10, 20, 1.0)], 1.0, Mixed())
    assert result.intensity.source == "electricitymaps:DE+table:DEU"
    assert result.intensity.stale and "stale=true" in result.basis()


def test_embodied_formula() -> None:
    model = EmbodiedModel("H100", lifetime_years=4, server_kg=2500, gpus_per_server=8)
    assert model.kg_per_device == 164 + 2500 / 8
    expected = 476.5 * 1000 / (4 * SECONDS_PER_YEAR)
    assert model.grams_per_device_second == pytest.approx(expected)
    # M = TE x (time reserved / lifetime) x share: 2 GPUs for an hour of a 4-year life.
    assert model.grams_for(2 * 3600) == pytest.approx(476.5 * 1000 * (3600 / (4 * SECONDS_PER_YEAR)) * 2)
    assert model.grams_for(-1) == 0.0
    # The worked example: 4 GPUs x 10 h of an H100 server, about half a kilogram.
    assert model.grams_for(4 * TEN_HOURS) / 1000 == pytest.approx(0.5436, abs=1e-4)


def test_device_table_is_sourced_and_matches_nvml_names() -> None:
    assert DEVICES["H100"].kg_co2e == 164 and not DEVICES["H100"].estimate
    assert DEVICES["A100"].kg_co2e == 150 and not DEVICES["A100"].estimate
    assert DEVICES["L4"].estimate and DEVICES["L40S"].estimate
    assert all(d.source for d in DEVICES.values())
    assert find_device("NVIDIA H100 80GB HBM3").model == "H100"
    assert find_device("NVIDIA A100-SXM4-40GB").model == "A100"
    assert find_device("NVIDIA L40S").model == "L40S" and find_device("NVIDIA L4").model == "L4"
    assert find_device("AMD Instinct MI300X") is None
    with pytest.raises(ConfigError) as info:
        EmbodiedModel("MI300X")
    assert info.value.key == "carbon.device_model"


def test_pue_defaults_presets_and_validation() -> None:
    assert DEFAULT_PUE == 1.58
    assert resolve_pue(None)[0] == 1.58
    assert resolve_pue(None, zone="gcp:europe-west4")[0] == 1.10
    assert resolve_pue(None, zone="aws:us-east-1")[0] == 1.15
    assert resolve_pue(None, zone="azure:westeurope")[0] == 1.18
    assert resolve_pue("gcp")[0] == 1.10 and resolve_pue("1.3")[0] == 1.3 and resolve_pue(1.2)[0] == 1.2
    assert all(p.source for p in PRESETS.values())
    for bad in (0.9, -1, math.nan, 7, "fast", True):
        with pytest.raises(ConfigError) as info:
            resolve_pue(bad, key="upstreams[0].pue")
        assert info.value.key == "upstreams[0].pue"
    assert validate_pue(1) == 1.0
