"""RaplMeter against a temporary powercap tree laid out like /sys/class/powercap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.meters.base import MeterError
from proxy.meters.rapl import RaplMeter

from .fake_pynvml import FakeClock

MAX_RANGE_UJ = 262_143_328_850  # a real package's max_energy_range_uj


def zone(root: Path, directory: str, name: str, energy_uj: int = 0, max_uj: int | None = MAX_RANGE_UJ) -> Path:
    path = root / directory
    path.mkdir()
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    if max_uj is not None:
        (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path / "energy_uj"


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two sockets with core and dram sub-zones, the control-type dir and an mmio duplicate."""
    (tmp_path / "intel-rapl").mkdir()
    (tmp_path / "intel-rapl" / "enabled").write_text("1\n")
    zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    zone(tmp_path, "intel-rapl:0:0", "core", 500_000)
    zone(tmp_path, "intel-rapl:0:1", "dram", 200_000)
    zone(tmp_path, "intel-rapl:1", "package-1", 3_000_000)
    zone(tmp_path, "intel-rapl:1:0", "dram", 400_000)
    zone(tmp_path, "intel-rapl-mmio:0", "package-0", 1_000_000)
    return tmp_path


def set_uj(root: Path, directory: str, value: int) -> None:
    (root / directory / "energy_uj").write_text(f"{value}\n")


async def test_discovers_package_and_dram_zones_per_socket(powercap: Path) -> None:
    meter = RaplMeter(root=powercap)
    assert meter.device_ids() == ()  # unknown until start() looks
    await meter.start()
    assert meter.device_ids() == ("package-0", "dram-0", "package-1", "dram-1")
    assert meter.kind == "rapl" and meter.method == "measured"
    await meter.close()


async def test_reports_joules_since_start_from_microjoules(powercap: Path) -> None:
    clock = FakeClock()
    meter = RaplMeter(root=powercap, clock=clock)
    await meter.start()
    clock.advance(0.5)
    set_uj(powercap, "intel-rapl:0", 1_000_000 + 60_000_000)  # 60 J in 0.5 s
    set_uj(powercap, "intel-rapl:0:1", 200_000 + 2_500_000)
    set_uj(powercap, "intel-rapl:1", 3_000_000 + 50_000_000)
    set_uj(powercap, "intel-rapl:1:0", 400_000 + 1_000_000)
    sample = await meter.read()
    assert sample.joules_by_device == {
        "package-0": pytest.approx(60.0),
        "dram-0": pytest.approx(2.5),
        "package-1": pytest.approx(50.0),
        "dram-1": pytest.approx(1.0),
    }
    assert sample.power_watts_by_device["package-0"] == pytest.approx(120.0)
    assert sample.timestamp_seconds == clock.now_seconds
    await meter.close()


async def test_zone_selection(powercap: Path) -> None:
    zone(powercap, "intel-rapl:2", "psys", 10)
    meter = RaplMeter(root=powercap, zones=("core", "psys"))
    await meter.start()
    assert meter.device_ids() == ("core-0", "psys")
    await meter.close()


async def test_wraparound_at_max_energy_range(powercap: Path) -> None:
    set_uj(powercap, "intel-rapl:0", MAX_RANGE_UJ - 3_000_000)  # 3 J before the wrap
    meter = RaplMeter(root=powercap, zones=("package",))
    await meter.start()
    set_uj(powercap, "intel-rapl:0", MAX_RANGE_UJ - 1_000_000)
    before_wrap = (await meter.read()).joules_by_device["package-0"]
    set_uj(powercap, "intel-rapl:0", 4_000_000)  # wrapped: 1 J to the top, then 4 J
    after_wrap = (await meter.read()).joules_by_device["package-0"]
    assert before_wrap == pytest.approx(2.0)
    assert after_wrap == pytest.approx(2.0 + 1.0 + 4.0)
    await meter.close()


async def test_unreadable_energy_says_it_needs_root(powercap: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def deny_energy(path: str, flags: int, *args: int) -> int:
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", deny_energy)
    with pytest.raises(MeterError, match=r"permission denied.*Linux 5\.10.*root") as err:
        await RaplMeter(root=powercap).start()
    assert "intel-rapl:0/energy_uj" in str(err.value)
    assert "'estimate'" in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file; the monkeypatched test covers it")
async def test_unreadable_energy_file_mode(powercap: Path) -> None:
    (powercap / "intel-rapl:0" / "energy_uj").chmod(0o000)
    with pytest.raises(MeterError, match="permission denied"):
        await RaplMeter(root=powercap).start()


async def test_no_powercap_suggests_estimate(tmp_path: Path) -> None:
    with pytest.raises(MeterError, match="does not exist.*'estimate'"):
        await RaplMeter(root=tmp_path / "missing").start()


async def test_no_matching_zones_lists_what_is_there(powercap: Path) -> None:
    with pytest.raises(MeterError, match=r"no uncore zones.*zones present: package-0, core-0, dram-0"):
        await RaplMeter(root=powercap, zones=("uncore",)).start()


async def test_zone_vanishing_mid_run_fails_that_read(powercap: Path) -> None:
    meter = RaplMeter(root=powercap)
    await meter.start()
    (powercap / "intel-rapl:1:0" / "energy_uj").unlink()
    with pytest.raises(MeterError, match="intel-rapl:1:0/energy_uj"):
        await meter.read()
    await meter.close()
    with pytest.raises(MeterError, match="before start"):
        await meter.read()


async def test_without_max_range_a_backwards_step_is_a_reset(tmp_path: Path) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 9_000_000, max_uj=None)
    meter = RaplMeter(root=tmp_path, zones=("package",))
    await meter.start()
    set_uj(tmp_path, "intel-rapl:0", 10_000_000)
    await meter.read()
    set_uj(tmp_path, "intel-rapl:0", 500_000)
    assert (await meter.read()).joules_by_device["package-0"] == pytest.approx(1.5)
    await meter.close()
