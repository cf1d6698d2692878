"""NvmlMeter against a fake pynvml: what an operator reading the figures would check."""

from __future__ import annotations

import sys
import threading
from typing import Callable

import pytest

from proxy.meters.base import DeviceFacts, EnergySample, MeterError, device_facts
from proxy.meters.nvml import NvmlMeter

from .fake_pynvml import COUNTER_WRAP_MILLIJOULES, FakeClock, FakeGpu, FakeNvml

Install = Callable[..., FakeNvml]
UUID_A = "GPU-3877938d-024c-c46b-5268-cd86ad37f0d7"
UUID_B = "GPU-8a1f6c42-1e5b-4c1d-9a3e-2b7c9d0e4f51"
ALTERNATIVES = "use meter kind 'scrape' (DCGM exporter), 'rapl' or 'estimate'"


async def poll(meter: NvmlMeter, clock: FakeClock, seconds: float, period: float) -> list[EnergySample]:
    samples = []
    for _ in range(round(seconds / period)):
        clock.advance(period)
        samples.append(await meter.read())
    return samples


async def test_reports_joules_per_configured_device_by_index_and_uuid(install_nvml: Install, clock: FakeClock) -> None:
    fake = install_nvml([FakeGpu(UUID_A, watts=300), FakeGpu(UUID_B, watts=100)])
    meter = NvmlMeter(["0", UUID_B], clock=clock)
    await meter.start()
    clock.advance(0.05)  # read half-way between the counter's 100 ms refreshes
    samples = await poll(meter, clock, seconds=2.0, period=0.1)
    first, last = samples[0], samples[-1]

    assert meter.device_ids() == ("0", UUID_B)
    assert set(last.joules_by_device) == {"0", UUID_B}
    elapsed = last.timestamp_seconds - first.timestamp_seconds
    assert elapsed == pytest.approx(1.9, abs=1e-9)
    assert last.joules_by_device["0"] - first.joules_by_device["0"] == pytest.approx(300 * elapsed, rel=1e-6)
    assert last.joules_by_device[UUID_B] - first.joules_by_device[UUID_B] == pytest.approx(100 * elapsed, rel=1e-6)
    assert last.power_watts_by_device["0"] == pytest.approx(300, rel=1e-6)
    assert meter.method == "measured" and meter.kind == "nvml"
    await meter.close()
    assert fake.init_count == 0, "nvmlShutdown pairs nvmlInit"


async def test_names_each_gpu_and_its_board_power_limit(install_nvml: Install, clock: FakeClock) -> None:
    install_nvml(
        [
            FakeGpu(UUID_A, name="NVIDIA A100-SXM4-40GB", enforced_limit_watts=300.0, management_limit_watts=400.0),
            FakeGpu(UUID_B, name="NVIDIA L4", enforced_limit_watts=None, management_limit_watts=72.0),
            FakeGpu("GPU-c", enforced_limit_watts=None, management_limit_watts=None),
        ]
    )
    meter = NvmlMeter(clock=clock)
    await meter.start()
    assert device_facts(meter) == {
        "0": DeviceFacts("NVIDIA A100-SXM4-40GB", 300.0),  # the enforced limit: capped below the board's 400 W
        "1": DeviceFacts("NVIDIA L4", 72.0),  # no enforced limit reported: the management limit
        "2": DeviceFacts("NVIDIA H100 80GB HBM3", None),
    }
    await meter.close()


async def test_no_devices_configured_means_every_gpu_by_index(install_nvml: Install, clock: FakeClock) -> None:
    install_nvml([FakeGpu(UUID_A), FakeGpu(UUID_B)])
    meter = NvmlMeter(None, clock=clock)
    await meter.start()
    assert meter.device_ids() == ("0", "1")
    assert set((await meter.read()).joules_by_device) == {"0", "1"}
    await meter.close()


async def test_refresh_lag_never_shows_a_positive_interval_with_zero_energy(
    install_nvml: Install, clock: FakeClock
) -> None:
    # Counter refreshes every 100 ms; we poll at 30 Hz, three reads per refresh.
    install_nvml([FakeGpu(UUID_A, watts=250)])
    meter = NvmlMeter(["0"], clock=clock)
    await meter.start()
    samples = await poll(meter, clock, seconds=3.0, period=1 / 30)

    for before, after in zip(samples, samples[1:]):
        duration = after.timestamp_seconds - before.timestamp_seconds
        energy = after.joules_by_device["0"] - before.joules_by_device["0"]
        assert duration >= 0 and energy >= 0
        if duration > 0:
            assert energy > 0, "a window with time but no energy would give its requests 0 J"
            assert energy / duration == pytest.approx(250, rel=0.35), "bounded by one poll period of skew"
        else:
            assert energy == 0
    # Over many refreshes the skew washes out.
    span = samples[-1].timestamp_seconds - samples[0].timestamp_seconds
    assert (samples[-1].joules_by_device["0"] - samples[0].joules_by_device["0"]) / span == pytest.approx(250, rel=0.03)
    # The timestamp is when the counter was seen to change: never after the read, and at most
    # one refresh plus one poll before it.
    for sample, read_at in zip(samples, [clock.now_seconds - (len(samples) - 1 - i) / 30 for i in range(len(samples))]):
        assert read_at - 0.1 - 1 / 30 - 1e-6 <= sample.timestamp_seconds <= read_at + 1e-6
    await meter.close()


async def test_a_refresh_is_placed_between_the_reads_around_it(install_nvml: Install, clock: FakeClock) -> None:
    # The counter refreshes every 100 ms from the meter's first read; we poll every 30.7 ms
    # (so that a read lands at every phase of the refresh period). A
    # sample's time is the midpoint of the last read that saw the old value and the first
    # that saw the new one: within half a poll of the refresh, and unbiased (stamped at the
    # later read, every interval was late by half a poll on average).
    install_nvml([FakeGpu(UUID_A, watts=250)])
    meter = NvmlMeter(["0"], clock=clock)
    started = clock.now_seconds
    await meter.start()
    period = 0.0307
    samples = await poll(meter, clock, seconds=6.0, period=period)
    stamps = sorted({s.timestamp_seconds for s in samples[1:]})
    offsets = [stamp - (started + 0.1 * round((stamp - started) / 0.1)) for stamp in stamps]
    assert len(offsets) >= 55
    assert all(abs(offset) <= period / 2 + 1e-9 for offset in offsets)
    assert abs(sum(offsets) / len(offsets)) < period / 8
    await meter.close()


async def test_counter_wraparound_keeps_counting_up(install_nvml: Install, clock: FakeClock) -> None:
    near_top = COUNTER_WRAP_MILLIJOULES - 40_000  # 40 J before the unsigned 64-bit counter rolls over
    fake = install_nvml([FakeGpu(UUID_A, watts=400, counter_start_millijoules=near_top)])
    meter = NvmlMeter(["0"], clock=clock)
    await meter.start()
    samples = await poll(meter, clock, seconds=1.0, period=0.1)

    assert fake.gpus[0].counter_millijoules < near_top, "the fake did wrap"
    values = [s.joules_by_device["0"] for s in samples]
    assert values == sorted(values)
    assert values[-1] == pytest.approx(400 * 1.0, rel=0.01)
    await meter.close()


async def test_driver_reload_resets_counter_but_output_never_decreases(install_nvml: Install, clock: FakeClock) -> None:
    fake = install_nvml([FakeGpu(UUID_A, watts=200)])
    meter = NvmlMeter(["0"], clock=clock)
    await meter.start()
    before = await poll(meter, clock, seconds=1.0, period=0.1)
    fake.reload_driver(0)
    after = await poll(meter, clock, seconds=1.0, period=0.1)

    values = [s.joules_by_device["0"] for s in before + after]
    assert values == sorted(values)
    # Only the energy between the last read and the reload is lost (at most one refresh).
    assert values[-1] == pytest.approx(200 * 2.0, abs=200 * 0.1 + 1e-6)
    await meter.close()


async def test_without_energy_counter_integrates_instant_power(install_nvml: Install, clock: FakeClock) -> None:
    fake = install_nvml([FakeGpu(UUID_A, watts=200, energy_counter=False)])
    meter = NvmlMeter(["0"], clock=clock)
    await meter.start()
    start = clock.now_seconds
    await poll(meter, clock, seconds=1.0, period=0.1)
    fake.set_watts(0, 400)
    samples = await poll(meter, clock, seconds=1.0, period=0.1)

    assert meter.sources() == {"0": "power_instant"}
    last = samples[-1]
    assert last.timestamp_seconds == pytest.approx(clock.now_seconds), "power readings are as of the read"
    assert last.timestamp_seconds - start == pytest.approx(2.0)
    # Trapezoid: the 200 -> 400 W step, just after a read, is seen as a ramp over one period (-10 J).
    assert last.joules_by_device["0"] == pytest.approx(200 + 400 - 10, rel=1e-6)
    assert last.power_watts_by_device["0"] == pytest.approx(400)
    await meter.close()


async def test_without_instant_power_field_falls_back_to_power_usage(install_nvml: Install, clock: FakeClock) -> None:
    install_nvml([FakeGpu(UUID_A, watts=150, energy_counter=False, instant_power_field=False)])
    meter = NvmlMeter(["0"], clock=clock)
    await meter.start()
    samples = await poll(meter, clock, seconds=1.0, period=0.1)
    assert meter.sources() == {"0": "power_usage"}
    assert samples[-1].joules_by_device["0"] == pytest.approx(150, rel=1e-6)
    await meter.close()


async def test_gpu_with_neither_energy_nor_power_is_refused(install_nvml: Install, clock: FakeClock) -> None:
    fake = install_nvml([FakeGpu(UUID_A, energy_counter=False, instant_power_field=False, power_usage=False)])
    with pytest.raises(MeterError, match="neither an energy counter nor power") as err:
        await NvmlMeter(["0"], clock=clock).start()
    assert ALTERNATIVES in str(err.value)
    assert fake.init_count == 0


async def test_mig_mode_is_refused_with_alternatives(install_nvml: Install, clock: FakeClock) -> None:
    fake = install_nvml([FakeGpu(UUID_A, mig_enabled=True)])
    with pytest.raises(MeterError, match="MIG mode enabled") as err:
        await NvmlMeter(["0"], clock=clock).start()
    assert ALTERNATIVES in str(err.value)
    assert fake.init_count == 0, "a failed start leaves NVML shut down"


async def test_mig_capable_gpu_with_mig_off_is_fine(install_nvml: Install, clock: FakeClock) -> None:
    install_nvml([FakeGpu(UUID_A, mig_capable=True)])
    meter = NvmlMeter(["0"], clock=clock)
    await meter.start()
    assert meter.device_ids() == ("0",)
    assert (await meter.read()).joules_by_device.keys() == {"0"}
    await meter.close()


async def test_mig_instance_uuid_is_refused(install_nvml: Install, clock: FakeClock) -> None:
    install_nvml([FakeGpu(UUID_A)])
    with pytest.raises(MeterError, match="MIG instance") as err:
        await NvmlMeter(["MIG-5f3c2a1b-0000-1111-2222-333344445555"], clock=clock).start()
    assert ALTERNATIVES in str(err.value)


async def test_vgpu_guest_is_refused(install_nvml: Install, clock: FakeClock) -> None:
    install_nvml([FakeGpu(UUID_A, virtualization_mode=2)])
    with pytest.raises(MeterError, match="vGPU") as err:
        await NvmlMeter(["0"], clock=clock).start()
    assert ALTERNATIVES in str(err.value)


async def test_passthrough_gpu_is_metered(install_nvml: Install, clock: FakeClock) -> None:
    install_nvml([FakeGpu(UUID_A, virtualization_mode=1)])
    meter = NvmlMeter(["0"], clock=clock)
    await meter.start()
    assert meter.device_ids() == ("0",)
    assert (await meter.read()).joules_by_device.keys() == {"0"}
    await meter.close()


async def test_no_driver_names_the_alternatives(install_nvml: Install, clock: FakeClock) -> None:
    install_nvml([], driver_loaded=False)
    with pytest.raises(MeterError, match="no usable NVIDIA driver") as err:
        await NvmlMeter(clock=clock).start()
    assert ALTERNATIVES in str(err.value)


async def test_pynvml_not_installed_names_the_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(MeterError, match="nvidia-ml-py") as err:
        await NvmlMeter().start()
    assert ALTERNATIVES in str(err.value)


async def test_real_pynvml_without_a_driver_fails_cleanly() -> None:
    meter = NvmlMeter()
    try:
        await meter.start()
    except MeterError as err:
        assert ALTERNATIVES in str(err)
    else:  # this machine has a working NVIDIA driver
        await meter.close()
        pytest.skip("an NVIDIA driver answered; nothing to check")


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("3", r"no GPU '3'.*2 GPU\(s\), indexes 0\.\.1"),
        ("GPU-00000000-0000-0000-0000-000000000000", r"no GPU 'GPU-00000000-0000-0000-0000-000000000000'"),
        ("gpu0", "neither a GPU index"),
    ],
)
async def test_unknown_device_is_named(install_nvml: Install, clock: FakeClock, device: str, expected: str) -> None:
    fake = install_nvml([FakeGpu(UUID_A), FakeGpu(UUID_B)])
    with pytest.raises(MeterError, match=expected):
        await NvmlMeter([device], clock=clock).start()
    assert fake.init_count == 0


async def test_lost_gpu_fails_the_read_naming_it(install_nvml: Install, clock: FakeClock) -> None:
    fake = install_nvml([FakeGpu(UUID_A), FakeGpu(UUID_B)])
    meter = NvmlMeter(["0", "1"], clock=clock)
    await meter.start()
    fake.gpus[1].lost = True
    with pytest.raises(MeterError, match="GPU '1'.*GPU is lost"):
        await meter.read()
    await meter.close()


async def test_reading_outside_start_and_close_is_an_error(install_nvml: Install, clock: FakeClock) -> None:
    install_nvml([FakeGpu(UUID_A)])
    meter = NvmlMeter(["0"], clock=clock)
    with pytest.raises(MeterError, match="before start"):
        await meter.read()
    await meter.start()
    await meter.start()  # idempotent
    await meter.close()
    await meter.close()  # idempotent
    with pytest.raises(MeterError):
        await meter.read()


async def test_nvml_is_only_called_off_the_event_loop(install_nvml: Install, clock: FakeClock) -> None:
    fake = install_nvml([FakeGpu(UUID_A)])
    meter = NvmlMeter(["0"], clock=clock)
    await meter.start()
    await poll(meter, clock, seconds=0.3, period=0.1)
    await meter.close()
    assert fake.call_threads and threading.get_ident() not in fake.call_threads
