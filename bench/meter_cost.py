"""Meter cost: CPU time of sampling N GPUs through NvmlMeter at a fixed rate.

Runs against the fake pynvml from tests/meters (no GPU needed), so the figure is our
own overhead (event loop hop, NVML thread, counters) plus the fake's small cost, not
the driver's. Reports CPU seconds per wall second as % of one core; goal: under 1%.

    .venv/bin/python bench/meter_cost.py [--devices 8] [--hz 10] [--seconds 10] [--power-fallback]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.meters.nvml import NvmlMeter  # noqa: E402


def load_fake() -> ModuleType:
    path = ROOT / "tests" / "meters" / "fake_pynvml.py"
    spec = importlib.util.spec_from_file_location("fake_pynvml", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


async def paced(seconds: float, period: float, work: object | None) -> int:
    """Call `work()` every `period` for `seconds`, on the loop's clock; returns the count."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    deadline = next_at + seconds
    count = 0
    while next_at < deadline:
        if work is not None:
            await work()  # type: ignore[operator]
        count += 1
        next_at += period
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    return count


async def measure(devices: int, hz: float, seconds: float, power_fallback: bool) -> None:
    fake_pynvml = load_fake()
    gpus = [
        fake_pynvml.FakeGpu(f"GPU-{i:08d}-0000-0000-0000-000000000000", watts=300.0 + i)
        for i in range(devices)
    ]
    for gpu in gpus:
        gpu.energy_counter = not power_fallback
    fake = fake_pynvml.FakeNvml(gpus, time.monotonic)
    sys.modules["pynvml"] = fake.module
    meter = NvmlMeter()
    await meter.start()
    period = 1.0 / hz

    # Baseline: the same paced loop with no reading, to show what the meter itself adds.
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await paced(seconds / 4, period, None)
    idle_cpu, idle_wall = time.process_time() - cpu0, time.perf_counter() - wall0

    cpu0, wall0 = time.process_time(), time.perf_counter()
    reads = await paced(seconds, period, meter.read)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    sample = await meter.read()
    await meter.close()

    source = "power fallback" if power_fallback else "energy counter"
    total_pct = 100 * cpu / wall
    meter_pct = 100 * (cpu / wall - idle_cpu / idle_wall)
    print(f"NvmlMeter ({source}), {devices} fake GPUs at {hz:g} Hz for {wall:.1f} s: {reads} reads")
    print(f"  CPU {cpu * 1000:.1f} ms = {total_pct:.3f}% of one core ({cpu / reads * 1e6:.0f} us per read)")
    print(f"  of which the paced loop alone: {100 * idle_cpu / idle_wall:.3f}%; meter adds {meter_pct:.3f}%")
    print(f"  last sample: {len(sample.joules_by_device)} devices, device 0 at {sample.joules_by_device['0']:.1f} J")
    print(f"  goal < 1% of one core: {'met' if total_pct < 1.0 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--power-fallback", action="store_true", help="integrate power instead of the counter")
    args = parser.parse_args()
    try:
        import uvloop  # the proxy's loop in production

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(measure(args.devices, args.hz, args.seconds, args.power_fallback))


if __name__ == "__main__":
    main()
