"""The Batch API over a compressed day: grams of a batch run now vs shifted, and what a
batch running costs interactive traffic.

One process: the sim model server on a sim GPU, the proxy metering it with the sim meter,
a grid with a normal daily swing (clean at solar noon, dirty in the evening), and a clock
that runs `--day-seconds` of real time per simulated day. Per repetition:

1. run now: the batch is submitted at 18:00 with no forecast (flat): it runs at once.
2. shifted: the same batch at 18:00 with the grid's forecast: it waits for the cleanest
   stretch before its 24 h deadline.
3. interactive p95: closed-loop chat clients alone, then beside a batch running now.

    python bench/batch.py [--lines 300] [--day-seconds 120] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import openai  # noqa: E402
import orjson  # noqa: E402

import bench._loadgen as _loadgen  # noqa: E402
from bench._common import ROOT, free_port, percentile, python_env, spread, wait_http  # noqa: E402
from proxy.batches.fake_forecast import ScriptedGrid  # noqa: E402
from proxy.carbon.forecast import ForecastWindow, flat  # noqa: E402
from proxy.config import config_from_dict  # noqa: E402
from proxy.meters.scrape import make_scrape_meter  # noqa: E402
from proxy.meters.sim import SimMeter  # noqa: E402
from proxy.receipts.model import MemoryReceiptStore  # noqa: E402
from proxy.serve import Service  # noqa: E402
from proxy.sim.config import SimModelConfig  # noqa: E402
from proxy.sim.gpu import SimGpu  # noqa: E402
from proxy.sim.server import run_sim_server  # noqa: E402

HOUR = 3600.0
DAY0 = 1_800_000_000.0 - (1_800_000_000.0 % 86400)  # a UTC midnight
SUBMIT = DAY0 + 18 * HOUR
CONCURRENCY = 4
YIELD_ABOVE = 64


def daily_trace(days: int = 3) -> list[tuple[float, float]]:
    """Hourly g/kWh: 320 at night, solar dip to 130 at noon, an evening peak of 380."""
    points = []
    for hour in range(days * 24):
        h = hour % 24
        solar = max(0.0, math.sin(math.pi * (h - 6) / 12)) if 6 <= h <= 18 else 0.0
        evening = 60.0 if 17 <= h <= 21 else 0.0
        points.append((DAY0 + hour * HOUR, round(320 - 190 * solar + evening, 1)))
    return points


class CompressedClock:
    """Simulated unix time running `factor` times faster than the wall clock."""

    def __init__(self, start_unix: float, factor: float) -> None:
        self.start_unix, self.factor, self._origin = start_unix, factor, time.monotonic()

    def now(self) -> float:
        return self.start_unix + (time.monotonic() - self._origin) * self.factor

    async def sleep_until(self, unix: float, wake: asyncio.Event) -> None:
        delay = min(1.0, (unix - self.now()) / self.factor)
        if delay > 0:
            try:
                await asyncio.wait_for(wake.wait(), delay)
            except asyncio.TimeoutError:
                pass


class Flat:
    def __init__(self, grid: ScriptedGrid) -> None:
        self.grid = grid

    def forecast(self, now_unix: float, horizon_seconds: float) -> list[ForecastWindow]:
        return flat(self.grid.value_at(now_unix), now_unix, horizon_seconds)


def lines(count: int) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "sim-llm", "messages": [{"role": "user", "content": f"Summarise document {i}."}], "max_tokens": 32},
            }
        )
        + b"\n"
        for i in range(count)
    )


async def start(sim_url: str, gpu: SimGpu, clock: Any, grid: ScriptedGrid, forecast: Any, tmp: Path) -> Service:
    data = {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
        "upstreams": [{"name": "sim", "url": sim_url}],
        "carbon": {"intensity": 300, "pue": 1.2},
        "attribution": {"idle_power_watts": 60},
        "receipts": {"path": ":memory:"},
        "batches": {"path": str(tmp / f"b{time.monotonic_ns()}.db"), "max_concurrency": CONCURRENCY, "yield_above_in_flight": YIELD_ABOVE},
    }
    service = Service(config_from_dict(data), meter=SimMeter(gpu), intensity=grid, receipts=MemoryReceiptStore())
    service.batch_clock, service.batch_forecast = clock, forecast
    await service.start()
    return service


async def submit(service: Service, count: int) -> tuple[openai.AsyncOpenAI, str]:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{service.public_port}/v1", api_key="sk-bench", max_retries=0)
    file = await client.files.create(file=("in.jsonl", io.BytesIO(lines(count))), purpose="batch")
    batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    return client, batch.id


async def ended(client: openai.AsyncOpenAI, batch_id: str) -> dict[str, Any]:
    batch = await client.batches.retrieve(batch_id)
    while batch.status not in ("completed", "expired", "failed", "cancelled"):
        await asyncio.sleep(0.2)
        batch = await client.batches.retrieve(batch_id)
    await client.close()
    return {"status": batch.status, "counts": batch.request_counts, **batch.model_extra["carbon"]}


async def interactive(port: int, seconds: float, clients: int = 4) -> list[float]:
    latencies: list[float] = []
    body = orjson.dumps({"model": "sim-llm", "messages": [{"role": "user", "content": "Quick question?"}], "max_tokens": 16})
    stop_at = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:

        async def loop() -> None:
            while time.monotonic() < stop_at:
                began = time.monotonic()
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    await response.read()
                latencies.append(time.monotonic() - began)

        await asyncio.gather(*(loop() for _ in range(clients)))
    return latencies


async def repetition(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    gpu = SimGpu(("0",), refresh_seconds=0.05)
    sim = await run_sim_server("127.0.0.1", 0, SimModelConfig(tokens_per_second=args.tokens_per_second), gpu)
    factor = 86400 / args.day_seconds
    out: dict[str, float] = {}
    try:
        for mode in ("now", "shifted"):
            clock = CompressedClock(SUBMIT, factor)
            grid = ScriptedGrid(clock, daily_trace())
            service = await start(sim.url, gpu, clock, grid, Flat(grid) if mode == "now" else grid, tmp)
            try:
                result = await ended(*await submit(service, args.lines))
            finally:
                await service.stop()
            out[f"{mode}_grams"] = result["emitted_grams"]
            out[f"{mode}_start_h"] = ((result["planned_start_at"] - DAY0) / HOUR) % 24
            out[f"{mode}_g_per_kwh"] = result["planned_g_per_kwh"]
            out[f"{mode}_reported_run_now_grams"] = result["run_now_grams"]  # the batch's own counterfactual
        clock = CompressedClock(SUBMIT, factor)
        grid = ScriptedGrid(clock, daily_trace())
        service = await start(sim.url, gpu, clock, grid, Flat(grid), tmp)
        try:
            alone = await interactive(service.public_port, args.interactive_seconds)
            client, batch_id = await submit(service, args.lines * 10)  # outlasts the measurement
            await asyncio.sleep(1.0)  # the batch is running
            beside = await interactive(service.public_port, args.interactive_seconds)
            await client.batches.cancel(batch_id)
            await ended(client, batch_id)
        finally:
            await service.stop()
        out["p95_alone_ms"] = percentile(alone, 95) * 1000
        out["p95_beside_ms"] = percentile(beside, 95) * 1000
    finally:
        await sim.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--day-seconds", type=float, default=120.0, help="real seconds per simulated day")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokens-per-second", type=float, default=200.0)
    parser.add_argument("--interactive-seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4, help="[batches] max_concurrency")
    parser.add_argument("--yield-above", type=int, default=64, help="[batches] yield_above_in_flight")
    args = parser.parse_args()
    global CONCURRENCY, YIELD_ABOVE
    CONCURRENCY, YIELD_ABOVE = args.concurrency, args.yield_above
    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            runs.append(asyncio.run(repetition(args, Path(tmp))))
            print(f"run {i + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in runs[-1].items()), flush=True)
    cut = [1 - r["shifted_grams"] / r["now_grams"] for r in runs]
    worse = [r["p95_beside_ms"] / r["p95_alone_ms"] - 1 for r in runs]
    print()
    print(f"| figure ({args.repeat} runs: median (min..max)) | value |")
    print("| --- | --- |")
    print(f"| batch of {args.lines} chat lines, submitted 18:00, run now: g CO2e | {spread([r['now_grams'] for r in runs], '{:.4f}')} |")
    print(f"| same batch shifted: g CO2e | {spread([r['shifted_grams'] for r in runs], '{:.4f}')} |")
    print(f"| shifted start (hour of day) | {spread([r['shifted_start_h'] for r in runs], '{:.1f}')} |")
    print(f"| cut by shifting | {spread([c * 100 for c in cut], '{:.1f}')} % |")
    print(f"| interactive p95 alone, ms | {spread([r['p95_alone_ms'] for r in runs], '{:.1f}')} |")
    print(f"| interactive p95 beside a running batch, ms | {spread([r['p95_beside_ms'] for r in runs], '{:.1f}')} |")
    print(f"| p95 change | {spread([w * 100 for w in worse], '{:+.1f}')} % |")


if __name__ == "__main__":
    main()
