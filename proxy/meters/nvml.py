"""NVIDIA GPUs through NVML: the board's energy counter, or integrated power where it has none.

Source, per device, chosen once at start():
1. `nvmlDeviceGetTotalEnergyConsumption`: mJ since the driver loaded (Volta and newer).
2. Where that is NotSupported: instantaneous power, `NVML_FI_DEV_POWER_INSTANT` through
   `nvmlDeviceGetFieldValues`, else `nvmlDeviceGetPowerUsage` (mW; a 1 s average on
   Ampere and newer, so short bursts are smoothed), integrated by the trapezoid rule.

Refresh lag (our choice, documented): the energy counter only moves every 20-100 ms,
so reads between refreshes return the same value. The sample's timestamp is when a
counter last changed (the latest such time across the meter's devices), estimated by
proxy.meters.counters as the midpoint of the reads around the change, not when we read it. Consecutive reads inside one refresh period therefore return identical
samples (zero duration, zero energy) instead of a positive duration with zero energy, and
each reported interval spans real refreshes, so short requests get their share of the
energy of the refresh window they ran in. The timestamp is off by at most half a polling
period (the change happened between two of our reads).

Output is joules since start(), never decreasing: a driver reload that restarts the
counter is taken as a reset (see counters.EnergyCounter).

All NVML calls run on one dedicated thread: they are blocking C calls, and one thread
keeps them serialized and off the default executor that file and DNS work share.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Callable, Sequence

from proxy.meters.base import DeviceFacts, EnergySample, MeterError
from proxy.meters.counters import EnergyCounter, PowerIntegrator

ALTERNATIVES = "use meter kind 'scrape' (DCGM exporter), 'rapl' or 'estimate'"

_COUNTER_WRAP_MILLIJOULES = 2**64  # an unsigned long long in NVML
_JOULES_PER_MILLIJOULE = 0.001
_WATTS_PER_MILLIWATT = 0.001

# nvmlValueType_t -> the member of the c_nvmlValue_t union that holds the number
_FIELD_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}

SOURCE_ENERGY = "energy_counter"
SOURCE_POWER_INSTANT = "power_instant"
SOURCE_POWER_AVERAGE = "power_usage"


class _Gpu:
    """One configured device. Touched only on the NVML thread."""

    __slots__ = ("device_id", "handle", "source", "facts", "counter", "integrator")

    def __init__(self, device_id: str, handle: Any, source: str, facts: DeviceFacts) -> None:
        self.device_id = device_id
        self.handle = handle
        self.source = source
        self.facts = facts
        self.counter = EnergyCounter(_JOULES_PER_MILLIJOULE, wrap_units=_COUNTER_WRAP_MILLIJOULES)
        self.integrator = PowerIntegrator()


class NvmlMeter:
    """Cumulative joules per NVIDIA GPU. Device ids are the configured strings ("0", "GPU-...")."""

    kind = "nvml"
    method = "measured"

    def __init__(
        self,
        devices: Sequence[str] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`devices`: GPU indexes ("0") or UUIDs ("GPU-..."); None means every GPU, by index."""
        self._configured: list[str] | None = None if devices is None else [str(d).strip() for d in devices]
        self._clock = clock
        self._nvml: ModuleType | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._gpus: list[_Gpu] = []

    def device_ids(self) -> Sequence[str]:
        if self._gpus:
            return tuple(gpu.device_id for gpu in self._gpus)
        return tuple(self._configured or ())

    def sources(self) -> dict[str, str]:
        """Which NVML reading each device uses (energy_counter, power_instant, power_usage)."""
        return {gpu.device_id: gpu.source for gpu in self._gpus}

    def device_facts(self) -> dict[str, DeviceFacts]:
        """Each GPU's name and enforced board power limit, as NVML gave them at start()."""
        return {gpu.device_id: gpu.facts for gpu in self._gpus}

    async def start(self) -> None:
        if self._nvml is not None:
            return
        try:
            # Lazily: the proxy must import and run on machines without NVIDIA drivers.
            import pynvml
        except ImportError as err:
            raise MeterError(
                f"nvml meter: the pynvml module (package nvidia-ml-py) cannot be imported ({err}); {ALTERNATIVES}"
            ) from err
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="carbon-proxy-nvml")
        loop = asyncio.get_running_loop()
        try:
            gpus = await loop.run_in_executor(executor, self._open, pynvml)  # shuts NVML down if it fails
        except BaseException:
            executor.shutdown(wait=False)
            raise
        try:
            # A first reading sets the origin and proves the chosen sources answer.
            await loop.run_in_executor(executor, self._read_all, pynvml, gpus)
        except BaseException:
            await loop.run_in_executor(executor, _shutdown_quietly, pynvml)
            executor.shutdown(wait=False)
            raise
        self._gpus = gpus
        self._nvml = pynvml
        self._executor = executor

    async def read(self) -> EnergySample:
        nvml, executor = self._nvml, self._executor
        if nvml is None or executor is None:
            raise MeterError("nvml meter: read() before start() or after close()")
        return await asyncio.get_running_loop().run_in_executor(executor, self._read_all, nvml, self._gpus)

    async def close(self) -> None:
        nvml, executor = self._nvml, self._executor
        self._nvml, self._executor = None, None
        if nvml is None or executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, _shutdown_quietly, nvml)
        finally:
            executor.shutdown(wait=False)

    # --- on the NVML thread -------------------------------------------------------------

    def _open(self, nvml: ModuleType) -> list[_Gpu]:
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            raise MeterError(f"nvml meter: no usable NVIDIA driver (nvmlInit failed: {err}); {ALTERNATIVES}") from err
        try:
            count = int(nvml.nvmlDeviceGetCount())
            wanted = self._configured if self._configured is not None else [str(i) for i in range(count)]
            if not wanted:
                raise MeterError(f"nvml meter: the NVIDIA driver answers but sees no GPU; {ALTERNATIVES}")
            return [self._open_gpu(nvml, device_id, count) for device_id in wanted]
        except BaseException:
            _shutdown_quietly(nvml)
            raise

    def _open_gpu(self, nvml: ModuleType, device_id: str, count: int) -> _Gpu:
        if device_id.startswith("MIG-"):
            raise MeterError(
                f"nvml meter: device {device_id!r} is a MIG instance; NVML reports no power or energy per MIG "
                f"instance; {ALTERNATIVES}"
            )
        visible = f"this host has {count} GPU(s), indexes 0..{count - 1}" if count else "this host has no GPU"
        try:
            if device_id.isdigit():
                handle = nvml.nvmlDeviceGetHandleByIndex(int(device_id))
            elif device_id.startswith("GPU-"):
                handle = nvml.nvmlDeviceGetHandleByUUID(device_id)
            else:
                raise MeterError(
                    f"nvml meter: device {device_id!r} is neither a GPU index like '0' nor a UUID like 'GPU-...'"
                )
        except nvml.NVMLError as err:
            raise MeterError(f"nvml meter: no GPU {device_id!r} ({err}); {visible}") from err
        _refuse_partitioned(nvml, handle, device_id)
        return _Gpu(device_id, handle, _choose_source(nvml, handle, device_id), _read_facts(nvml, handle))

    def _read_all(self, nvml: ModuleType, gpus: list[_Gpu]) -> EnergySample:
        joules: dict[str, float] = {}
        watts: dict[str, float] = {}
        stamp_seconds = float("-inf")
        for gpu in gpus:
            try:
                if gpu.source == SOURCE_ENERGY:
                    raw_millijoules = nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle)
                    joules[gpu.device_id] = gpu.counter.update(raw_millijoules, self._clock())
                    changed_at = gpu.counter.changed_at_seconds
                    assert changed_at is not None
                    stamp_seconds = max(stamp_seconds, changed_at)
                    power = gpu.counter.watts()
                else:
                    power = _read_power_watts(nvml, gpu.handle, gpu.source)
                    now = self._clock()
                    joules[gpu.device_id] = gpu.integrator.update(power, now)
                    stamp_seconds = max(stamp_seconds, now)
            except nvml.NVMLError as err:
                raise MeterError(f"nvml meter: reading GPU {gpu.device_id!r} failed: {err}") from err
            if power is not None:
                watts[gpu.device_id] = power
        return EnergySample(timestamp_seconds=stamp_seconds, joules_by_device=joules, power_watts_by_device=watts)


def _read_facts(nvml: ModuleType, handle: Any) -> DeviceFacts:
    """Name and board power limit: the enforced limit (the lower of the management limit
    and any other cap), else the management limit; None where NVML says NotSupported."""
    name = None
    try:
        raw = nvml.nvmlDeviceGetName(handle)
        name = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)  # bytes before 11.5
    except (AttributeError, nvml.NVMLError):
        pass
    limit = None
    for getter in ("nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerManagementLimit"):
        try:
            milliwatts = float(getattr(nvml, getter)(handle))
        except (AttributeError, nvml.NVMLError):
            continue
        if milliwatts > 0:
            limit = milliwatts * _WATTS_PER_MILLIWATT
            break
    return DeviceFacts(name, limit)


def _refuse_partitioned(nvml: ModuleType, handle: Any, device_id: str) -> None:
    """MIG and vGPU guests get no per-tenant power: metering them would be fiction."""
    try:
        current_mig_mode = nvml.nvmlDeviceGetMigMode(handle)[0]
    except nvml.NVMLError:  # NotSupported: a GPU without MIG
        current_mig_mode = None
    if current_mig_mode == nvml.NVML_DEVICE_MIG_ENABLE:
        raise MeterError(
            f"nvml meter: GPU {device_id!r} has MIG mode enabled; NVML reports power only for the whole GPU, "
            f"not per MIG instance, so its energy cannot be split between the servers on it; {ALTERNATIVES}"
        )
    try:
        mode = nvml.nvmlDeviceGetVirtualizationMode(handle)
    except nvml.NVMLError:
        return
    if mode not in (nvml.NVML_GPU_VIRTUALIZATION_MODE_NONE, nvml.NVML_GPU_VIRTUALIZATION_MODE_PASSTHROUGH):
        raise MeterError(
            f"nvml meter: GPU {device_id!r} is a vGPU (virtualization mode {mode}); a vGPU guest sees no power "
            f"or energy counters; {ALTERNATIVES}"
        )


def _choose_source(nvml: ModuleType, handle: Any, device_id: str) -> str:
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        return SOURCE_ENERGY
    except nvml.NVMLError_NotSupported:
        pass  # pre-Volta, or a board that does not expose it: fall back to power
    except nvml.NVMLError as err:
        raise MeterError(f"nvml meter: GPU {device_id!r} energy counter failed: {err}; {ALTERNATIVES}") from err
    if _instant_power_milliwatts(nvml, handle) is not None:
        return SOURCE_POWER_INSTANT
    try:
        nvml.nvmlDeviceGetPowerUsage(handle)
        return SOURCE_POWER_AVERAGE
    except nvml.NVMLError as err:
        raise MeterError(
            f"nvml meter: GPU {device_id!r} reports neither an energy counter nor power ({err}); {ALTERNATIVES}"
        ) from err


def _instant_power_milliwatts(nvml: ModuleType, handle: Any) -> float | None:
    field_id = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)  # absent from older bindings
    if field_id is None:
        return None
    try:
        value = nvml.nvmlDeviceGetFieldValues(handle, [field_id])[0]
    except nvml.NVMLError:
        return None
    if value.nvmlReturn != nvml.NVML_SUCCESS:
        return None
    return float(getattr(value.value, _FIELD_VALUE_MEMBER.get(value.valueType, "uiVal")))


def _read_power_watts(nvml: ModuleType, handle: Any, source: str) -> float:
    if source == SOURCE_POWER_INSTANT:
        milliwatts = _instant_power_milliwatts(nvml, handle)
        if milliwatts is not None:
            return milliwatts * _WATTS_PER_MILLIWATT
    return float(nvml.nvmlDeviceGetPowerUsage(handle)) * _WATTS_PER_MILLIWATT


def _shutdown_quietly(nvml: ModuleType) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:  # closing must not mask the error that made us close
        pass
