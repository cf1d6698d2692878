"""CPU and memory energy from Linux powercap (Intel RAPL; AMD exposes the same files).

For CPU-served models (llama.cpp, Ollama on CPU) and for the host's share next to GPUs.
Zones live under /sys/class/powercap as `intel-rapl:N` (a socket's package) and
`intel-rapl:N:M` (its core, uncore and dram sub-zones); each has `name`, `energy_uj`
(microjoules) and `max_energy_range_uj` (where energy_uj wraps back to zero, every few
minutes to hours at server power).

Device ids: a package zone keeps its own name ("package-0", "package-1"); a sub-zone is
its name plus its socket's index ("dram-0", "core-1"); a top-level zone without an index
in its name keeps it bare ("psys"). `intel-rapl-mmio` zones are skipped: they meter the
same packages again, and counting them would double the energy.

Permissions: since Linux 5.10 energy_uj is readable only by root (CVE-2020-8694,
"PLATYPUS"), so a non-root proxy needs the files made readable.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from proxy.meters.base import EnergySample, MeterError
from proxy.meters.counters import EnergyCounter

_JOULES_PER_MICROJOULE = 1e-6
_ZONE_DIR = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")
_INDEXED_NAME = re.compile(r"^(.*)-(\d+)$")
_PERMISSION_HINT = (
    "since Linux 5.10 energy_uj is readable only by root (CVE-2020-8694): run the proxy as root, make the "
    "files readable (e.g. a udev rule or `chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj` at boot), "
    "or use meter kind 'estimate'"
)


@dataclass(slots=True)
class _Zone:
    device_id: str
    kind: str
    energy_path: str
    counter: EnergyCounter


class RaplMeter:
    """Cumulative joules per RAPL zone, e.g. {"package-0": ..., "dram-0": ...}."""

    kind = "rapl"
    method = "measured"

    def __init__(
        self,
        root: str | os.PathLike[str] = "/sys/class/powercap",
        zones: Sequence[str] = ("package", "dram"),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`zones`: which kinds to report: package, dram, core, uncore, psys."""
        self.root = os.fspath(root)
        self.zone_kinds = tuple(zones)
        self._clock = clock
        self._zones: list[_Zone] = []
        self._started = False
        # Reads go to the default executor's threads; serialize them so counters see
        # readings in the order they were taken.
        self._lock = asyncio.Lock()

    def device_ids(self) -> Sequence[str]:
        """Known after start(): the zones found on this host."""
        return tuple(zone.device_id for zone in self._zones)

    async def start(self) -> None:
        if self._started:
            return
        zones = await asyncio.to_thread(self._discover)
        # A first reading sets the origin and surfaces permission problems now.
        await asyncio.to_thread(self._read_all, zones)
        self._zones = zones
        self._started = True

    async def read(self) -> EnergySample:
        if not self._started:
            raise MeterError("rapl meter: read() before start() or after close()")
        async with self._lock:
            return await asyncio.to_thread(self._read_all, self._zones)

    async def close(self) -> None:
        self._started = False

    # --- in a worker thread -------------------------------------------------------------

    def _discover(self) -> list[_Zone]:
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            raise MeterError(
                f"rapl meter: {self.root} does not exist (not Linux, powercap not loaded, or /sys not mounted "
                f"into the container); use meter kind 'estimate'"
            ) from None
        except OSError as err:
            raise MeterError(f"rapl meter: cannot list {self.root}: {err}") from err
        found: list[str] = []
        zones: list[_Zone] = []
        for entry in sorted(entries, key=_natural):
            match = _ZONE_DIR.match(entry)
            if match is None:
                continue
            directory = os.path.join(self.root, entry)
            name = _read_text(os.path.join(directory, "name")).strip()
            socket, sub_zone = match.group(1), match.group(2)
            indexed = _INDEXED_NAME.match(name)
            kind = indexed.group(1) if indexed else name
            if sub_zone is not None:
                device_id = f"{kind}-{socket}"
            else:
                device_id = name
            found.append(device_id)
            if kind not in self.zone_kinds:
                continue
            if any(zone.device_id == device_id for zone in zones):
                raise MeterError(f"rapl meter: two zones under {self.root} are both called {device_id!r}")
            wrap = _read_optional_int(os.path.join(directory, "max_energy_range_uj"))
            counter = EnergyCounter(_JOULES_PER_MICROJOULE, wrap_units=wrap)
            zones.append(_Zone(device_id, kind, os.path.join(directory, "energy_uj"), counter))
        if not zones:
            present = ", ".join(found) if found else "none"
            raise MeterError(
                f"rapl meter: no {'/'.join(self.zone_kinds)} zones under {self.root} (zones present: {present}); "
                f"use meter kind 'estimate'"
            )
        return zones

    def _read_all(self, zones: list[_Zone]) -> EnergySample:
        joules: dict[str, float] = {}
        watts: dict[str, float] = {}
        stamp_seconds = float("-inf")
        for zone in zones:
            text = _read_text(zone.energy_path)
            try:
                raw_microjoules = int(text)
            except ValueError:
                raise MeterError(f"rapl meter: {zone.energy_path} holds {text.strip()!r}, not a number") from None
            joules[zone.device_id] = zone.counter.update(raw_microjoules, self._clock())
            assert zone.counter.changed_at_seconds is not None
            stamp_seconds = max(stamp_seconds, zone.counter.changed_at_seconds)
            power = zone.counter.watts()
            if power is not None:
                watts[zone.device_id] = power
        return EnergySample(timestamp_seconds=stamp_seconds, joules_by_device=joules, power_watts_by_device=watts)


def _read_text(path: str) -> str:
    """One small sysfs file. os-level calls: no buffering layer for a 20-byte read."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.read(fd, 64).decode("ascii", errors="replace")
        finally:
            os.close(fd)
    except PermissionError as err:
        raise MeterError(f"rapl meter: cannot read {path}: permission denied; {_PERMISSION_HINT}") from err
    except OSError as err:
        raise MeterError(f"rapl meter: cannot read {path}: {err.strerror or err}") from err


def _read_optional_int(path: str) -> int | None:
    try:
        return int(_read_text(path))
    except (MeterError, ValueError):
        return None  # without a known range a backwards step is taken as a reset


def _natural(entry: str) -> list[int | str]:
    """intel-rapl:2 before intel-rapl:10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", entry)]
