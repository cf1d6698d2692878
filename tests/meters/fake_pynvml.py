"""A stand-in for the `pynvml` module: GPUs whose energy, power and quirks the test controls.

Installed through sys.modules, so NvmlMeter's lazy `import pynvml` gets it. It copies the
real binding's surface that the meter uses: the same function names, constants and
NVMLError subclasses, and the energy counter's habits (mJ, refreshes every 100 ms of
the clock it is given, unsigned 64-bit wraparound, restarts on driver reload).
"""

from __future__ import annotations

import math
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable

NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_GPU_IS_LOST = 15
NVML_FI_DEV_POWER_INSTANT = 186
NVML_VALUE_TYPE_UNSIGNED_INT = 1
COUNTER_WRAP_MILLIJOULES = 2**64

_MESSAGES = {
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML error {self.value}")


class NVMLError_NotSupported(NVMLError):  # noqa: N801 - the real binding's name
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_NOT_SUPPORTED)


class NVMLError_NotFound(NVMLError):  # noqa: N801
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_NOT_FOUND)


class NVMLError_DriverNotLoaded(NVMLError):  # noqa: N801
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_DRIVER_NOT_LOADED)


class NVMLError_GpuIsLost(NVMLError):  # noqa: N801
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_GPU_IS_LOST)


class FakeClock:
    """time.monotonic() under the test's control."""

    def __init__(self, start_seconds: float = 1000.0) -> None:
        self.now_seconds = start_seconds

    def __call__(self) -> float:
        return self.now_seconds

    def advance(self, seconds: float) -> None:
        self.now_seconds += seconds


@dataclass
class FakeGpu:
    uuid: str
    watts: float = 300.0
    name: str = "NVIDIA H100 80GB HBM3"
    enforced_limit_watts: float | None = 700.0  # None: NotSupported
    management_limit_watts: float | None = 700.0
    energy_counter: bool = True
    instant_power_field: bool = True
    power_usage: bool = True
    mig_enabled: bool = False
    mig_capable: bool = False
    virtualization_mode: int = 0
    counter_start_millijoules: int = 0
    refresh_seconds: float = 0.1
    lost: bool = False
    # state, advanced lazily to the clock
    true_joules: float = field(default=0.0, init=False)
    integrated_to: float | None = field(default=None, init=False)
    next_refresh: float | None = field(default=None, init=False)
    counter_base_millijoules: int = field(default=0, init=False)
    counter_millijoules: int = field(default=0, init=False)


class FakeNvml:
    """Owns the fake GPUs and the module object the meter imports."""

    def __init__(self, gpus: list[FakeGpu], clock: Callable[[], float], *, driver_loaded: bool = True) -> None:
        self.gpus = gpus
        self.clock = clock
        self.driver_loaded = driver_loaded
        self.init_count = 0
        self.call_threads: set[int] = set()
        for gpu in gpus:
            gpu.counter_base_millijoules = gpu.counter_start_millijoules
            gpu.counter_millijoules = gpu.counter_start_millijoules % COUNTER_WRAP_MILLIJOULES
        self.module = self._build_module()

    # --- test controls -----------------------------------------------------------------

    def set_watts(self, index: int, watts: float) -> None:
        gpu = self.gpus[index]
        self._catch_up(gpu)
        gpu.watts = watts

    def true_joules(self, index: int) -> float:
        """Energy the GPU really used since it was created, up to now."""
        gpu = self.gpus[index]
        self._catch_up(gpu)
        assert gpu.integrated_to is not None
        return gpu.true_joules + gpu.watts * (self.clock() - gpu.integrated_to)

    def reload_driver(self, index: int) -> None:
        """The counter restarts from zero, as it does when the driver reloads."""
        gpu = self.gpus[index]
        self._catch_up(gpu)
        gpu.counter_base_millijoules = -round(gpu.true_joules * 1000)
        gpu.counter_millijoules = 0

    # --- behaviour -------------------------------------------------------------------

    def _catch_up(self, gpu: FakeGpu) -> None:
        now = self.clock()
        if gpu.integrated_to is None or gpu.next_refresh is None:
            gpu.integrated_to = now
            gpu.next_refresh = now + gpu.refresh_seconds
            return
        # The counter moves only at refresh instants, like the real one.
        while gpu.next_refresh <= now:
            gpu.true_joules += gpu.watts * (gpu.next_refresh - gpu.integrated_to)
            gpu.integrated_to = gpu.next_refresh
            raw = gpu.counter_base_millijoules + round(gpu.true_joules * 1000)
            gpu.counter_millijoules = raw % COUNTER_WRAP_MILLIJOULES
            gpu.next_refresh += gpu.refresh_seconds
        if now > gpu.integrated_to:
            gpu.true_joules += gpu.watts * (now - gpu.integrated_to)
            gpu.integrated_to = now

    def _gpu(self, handle: Any) -> FakeGpu:
        self.call_threads.add(threading.get_ident())
        if self.init_count <= 0:
            raise NVMLError(1)  # Uninitialized
        gpu = self.gpus[handle]
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        self._catch_up(gpu)
        return gpu

    def _build_module(self) -> types.ModuleType:
        fake = self
        module = types.ModuleType("pynvml")
        module.__dict__.update(
            NVML_SUCCESS=NVML_SUCCESS,
            NVML_DEVICE_MIG_ENABLE=1,
            NVML_DEVICE_MIG_DISABLE=0,
            NVML_GPU_VIRTUALIZATION_MODE_NONE=0,
            NVML_GPU_VIRTUALIZATION_MODE_PASSTHROUGH=1,
            NVML_GPU_VIRTUALIZATION_MODE_VGPU=2,
            NVML_FI_DEV_POWER_INSTANT=NVML_FI_DEV_POWER_INSTANT,
            NVMLError=NVMLError,
            NVMLError_NotSupported=NVMLError_NotSupported,
            NVMLError_NotFound=NVMLError_NotFound,
            NVMLError_DriverNotLoaded=NVMLError_DriverNotLoaded,
            NVMLError_GpuIsLost=NVMLError_GpuIsLost,
        )

        def nvmlInit() -> None:
            fake.call_threads.add(threading.get_ident())
            if not fake.driver_loaded:
                raise NVMLError_DriverNotLoaded()
            fake.init_count += 1

        def nvmlShutdown() -> None:
            if fake.init_count <= 0:
                raise NVMLError(1)
            fake.init_count -= 1

        def nvmlDeviceGetCount() -> int:
            return len(fake.gpus)

        def nvmlDeviceGetHandleByIndex(index: int) -> int:
            if not 0 <= index < len(fake.gpus):
                raise NVMLError(2)  # Invalid Argument, as the real library says
            return index

        def nvmlDeviceGetHandleByUUID(uuid: str) -> int:
            for index, gpu in enumerate(fake.gpus):
                if gpu.uuid == uuid:
                    return index
            raise NVMLError_NotFound()

        def nvmlDeviceGetMigMode(handle: int) -> list[int]:
            gpu = fake._gpu(handle)
            if not (gpu.mig_capable or gpu.mig_enabled):
                raise NVMLError_NotSupported()
            mode = 1 if gpu.mig_enabled else 0
            return [mode, mode]

        def nvmlDeviceGetVirtualizationMode(handle: int) -> int:
            return fake._gpu(handle).virtualization_mode

        def nvmlDeviceGetTotalEnergyConsumption(handle: int) -> int:
            gpu = fake._gpu(handle)
            if not gpu.energy_counter:
                raise NVMLError_NotSupported()
            return gpu.counter_millijoules

        def nvmlDeviceGetFieldValues(handle: int, field_ids: list[int]) -> list[types.SimpleNamespace]:
            gpu = fake._gpu(handle)
            values = []
            for field_id in field_ids:
                supported = field_id == NVML_FI_DEV_POWER_INSTANT and gpu.instant_power_field
                values.append(
                    types.SimpleNamespace(
                        fieldId=field_id,
                        nvmlReturn=NVML_SUCCESS if supported else NVML_ERROR_NOT_SUPPORTED,
                        valueType=NVML_VALUE_TYPE_UNSIGNED_INT,
                        value=types.SimpleNamespace(uiVal=math.floor(gpu.watts * 1000) if supported else 0),
                    )
                )
            return values

        def nvmlDeviceGetPowerUsage(handle: int) -> int:
            gpu = fake._gpu(handle)
            if not gpu.power_usage:
                raise NVMLError_NotSupported()
            return math.floor(gpu.watts * 1000)

        def nvmlDeviceGetName(handle: int) -> str:
            return fake._gpu(handle).name

        def nvmlDeviceGetEnforcedPowerLimit(handle: int) -> int:
            watts = fake._gpu(handle).enforced_limit_watts
            if watts is None:
                raise NVMLError_NotSupported()
            return round(watts * 1000)

        def nvmlDeviceGetPowerManagementLimit(handle: int) -> int:
            watts = fake._gpu(handle).management_limit_watts
            if watts is None:
                raise NVMLError_NotSupported()
            return round(watts * 1000)

        for function in (
            nvmlInit,
            nvmlDeviceGetName,
            nvmlDeviceGetEnforcedPowerLimit,
            nvmlDeviceGetPowerManagementLimit,
            nvmlShutdown,
            nvmlDeviceGetCount,
            nvmlDeviceGetHandleByIndex,
            nvmlDeviceGetHandleByUUID,
            nvmlDeviceGetMigMode,
            nvmlDeviceGetVirtualizationMode,
            nvmlDeviceGetTotalEnergyConsumption,
            nvmlDeviceGetFieldValues,
            nvmlDeviceGetPowerUsage,
        ):
            setattr(module, function.__name__, function)
        return module
