"""Fixtures shared by the meter tests: a controllable clock and a fake NVML."""

from __future__ import annotations

import sys
from typing import Callable

import pytest

from .fake_pynvml import FakeClock, FakeGpu, FakeNvml


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def install_nvml(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> Callable[..., FakeNvml]:
    """Put a fake `pynvml` with the given GPUs where NvmlMeter's lazy import finds it."""

    def install(gpus: list[FakeGpu], *, driver_loaded: bool = True) -> FakeNvml:
        fake = FakeNvml(gpus, clock, driver_loaded=driver_loaded)
        monkeypatch.setitem(sys.modules, "pynvml", fake.module)
        return fake

    return install
