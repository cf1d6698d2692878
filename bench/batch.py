"""The Batch API over a compressed day: grams of a batch run now vs shifted, and what a
batch running costs interactive traffic.

The sim model server runs in a process of its own (`--sim process`, the default; the
proxy meters it through its DCGM-style /metrics, as a scraped exporter), and so do the
interactive clients (`--loadgen process`, bench/_loadgen.py): a real engine runs on its
own GPU host, and in one process on this 2-core machine the sim's steps and the clients
waited on the proxy's CPU, which added +6..+20 points of p95 that no engine would see
(`--sim inline --loadgen inline` is the old layout, kept to show it). What is left is the
physical contention the latency guard manages: batch lines' prefill chunks lengthen the
forward passes the interactive requests decode in.

The proxy runs in this process with a grid that has a normal daily swing (clean at solar
noon, dirty in the evening) and a clock that runs `--day-seconds` of real time per
simulated day. Per repetition:

1. run now: the batch is submitted at 18:00 with no forecast (flat): it runs at once.
2. shifted: the same batch at 18:00 with the grid's forecast: it waits for the cleanest
   stretch before its 24 h deadline.
3. interactive p95: closed-loop chat clients alone, then beside a batch running now,
   with the latency guard's objective (`--latency-ratio`, `--latency-objective`).

    python bench/batch.py [--lines 300] [--day-seconds 120] [--repeat 3] [--latency-only]
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


class SimUpstream:
    """The sim model server: a process of its own (`--sim process`, the default: a real
    engine runs on its own machine, so its steps must not wait on the proxy's CPU), metered
    through its DCGM-style /metrics like a scraped exporter; or in this process
    (`--sim inline`: its SimGpu read directly, everything on one event loop)."""

    def __init__(self, mode: str, tokens_per_second: float, tmp: Path) -> None:
        self.mode, self.tokens_per_second, self.tmp = mode, tokens_per_second, tmp
        self.url = ""
        self._gpu: SimGpu | None = None
        self._server: Any = None
        self._proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> "SimUpstream":
        if self.mode == "inline":
            self._gpu = SimGpu(("0",), refresh_seconds=0.05)
            self._server = await run_sim_server("127.0.0.1", 0, SimModelConfig(tokens_per_second=self.tokens_per_second), self._gpu)
            self.url = self._server.url
            return self
        port = free_port()
        argv = [sys.executable, "-m", "proxy.sim", "--port", str(port), "--tokens-per-second", f"{self.tokens_per_second:g}",
                "--refresh-seconds", "0.05"]  # fmt: skip
        log = open(self.tmp / "sim.log", "wb")
        self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=python_env())
        log.close()
        self.url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(wait_http, self.url + "/health", 20.0, self._proc)
        return self

    def meter(self) -> Any:
        if self._gpu is not None:
            return SimMeter(self._gpu)
        return make_scrape_meter("dcgm", url=self.url + "/metrics")

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.close()
        if self._proc is not None:
            self._proc.terminate()
            await asyncio.to_thread(self._proc.wait, 10)


async def start(sim: SimUpstream, clock: Any, grid: ScriptedGrid, forecast: Any, tmp: Path, batches: dict[str, Any]) -> Service:
    data = {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
        "upstreams": [{"name": "sim", "url": sim.url}],
        "carbon": {"intensity": 300, "pue": 1.2},
        "attribution": {"idle_power_watts": 60},
        "receipts": {"path": ":memory:"},
        "batches": {"path": str(tmp / f"b{time.monotonic_ns()}.db"), **batches},
    }
    service = Service(config_from_dict(data), meter=sim.meter(), intensity=grid, receipts=MemoryReceiptStore())
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


async def interactive_inline(port: int, seconds: float, clients: int) -> list[float]:
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


class LoadGenerator:
    """Closed-loop chat clients in a process of their own (bench/_loadgen.py), so that what
    is measured does not share an event loop with the clients (`--loadgen process`)."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_loadgen.serve, args=(child,), name="loadgen", daemon=True)
        self.proc.start()

    def _closed_loop(self, port: int, seconds: float, clients: int) -> list[float]:
        self.conn.send(("closed_loop", {"base": f"http://127.0.0.1:{port}", "concurrency": clients, "seconds": seconds, "max_tokens": 16}))
        while True:
            kind, payload = self.conn.recv()
            if kind == "error":
                raise RuntimeError(f"load generator failed: {payload}")
            if kind == "done":
                return list(payload["latencies"])

    async def closed_loop(self, port: int, seconds: float, clients: int) -> list[float]:
        return await asyncio.to_thread(self._closed_loop, port, seconds, clients)

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)


def guard_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {"max_concurrency": args.concurrency, "yield_above_in_flight": args.yield_above}
    settings["interactive_latency_objective_ratio"] = args.latency_ratio
    if args.latency_objective:
        settings["interactive_latency_objective_seconds"] = args.latency_objective
    settings["interactive_latency_window_seconds"] = args.latency_window
    return settings


async def repetition(args: argparse.Namespace, tmp: Path, loadgen: LoadGenerator | None) -> dict[str, float]:
    factor = 86400 / args.day_seconds
    batches = guard_settings(args)
    out: dict[str, float] = {}

    async def interactive(port: int) -> list[float]:
        if loadgen is not None:
            return await loadgen.closed_loop(port, args.interactive_seconds, args.clients)
        return await interactive_inline(port, args.interactive_seconds, args.clients)

    async with SimUpstream(args.sim, args.tokens_per_second, tmp) as sim:
        for mode in () if args.latency_only else ("now", "shifted"):
            clock = CompressedClock(SUBMIT, factor)
            grid = ScriptedGrid(clock, daily_trace())
            service = await start(sim, clock, grid, Flat(grid) if mode == "now" else grid, tmp, batches)
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
        service = await start(sim, clock, grid, Flat(grid), tmp, batches)
        try:
            alone = await interactive(service.public_port)
            client, batch_id = await submit(service, args.lines * 10)  # outlasts the measurement
            await asyncio.sleep(1.0)  # the batch is running
            runner = service.batches.runner
            done_before = sum(service.batches.metrics.lines.values())
            beside = await interactive(service.public_port)
            out["lines_per_s_beside"] = (sum(service.batches.metrics.lines.values()) - done_before) / args.interactive_seconds
            guard = runner.guard
            out["breaches"] = float(guard.breaches) if guard is not None else 0.0
            await client.batches.cancel(batch_id)
            await ended(client, batch_id)
        finally:
            await service.stop()
        out["p95_alone_ms"] = percentile(alone, 95) * 1000
        out["p95_beside_ms"] = percentile(beside, 95) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--day-seconds", type=float, default=120.0, help="real seconds per simulated day")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokens-per-second", type=float, default=200.0)
    parser.add_argument("--interactive-seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4, help="closed-loop interactive clients")
    parser.add_argument("--concurrency", type=int, default=4, help="[batches] max_concurrency")
    parser.add_argument("--yield-above", type=int, default=64, help="[batches] yield_above_in_flight")
    parser.add_argument("--latency-ratio", type=float, default=1.05, help="[batches] interactive_latency_objective_ratio (0: off)")
    parser.add_argument("--latency-objective", type=float, default=0.0, help="[batches] interactive_latency_objective_seconds (0: none)")
    parser.add_argument("--latency-window", type=float, default=2.0, help="[batches] interactive_latency_window_seconds")
    parser.add_argument("--sim", choices=("process", "inline"), default="process", help="the sim model server's own process, or this one")
    parser.add_argument("--loadgen", choices=("process", "inline"), default="process", help="interactive clients' own process, or this one")
    parser.add_argument("--latency-only", action="store_true", help="skip the grams runs (now vs shifted)")
    args = parser.parse_args()
    import tempfile

    runs = []
    loadgen = LoadGenerator() if args.loadgen == "process" else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repeat):
                runs.append(asyncio.run(repetition(args, Path(tmp), loadgen)))
                print(f"run {i + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in runs[-1].items()), flush=True)
    finally:
        if loadgen is not None:
            loadgen.close()
    worse = [r["p95_beside_ms"] / r["p95_alone_ms"] - 1 for r in runs]
    print()
    print(f"sim: {args.sim}, load generator: {args.loadgen}, max_concurrency {args.concurrency}, "
          f"objective ratio {args.latency_ratio:g}, absolute {args.latency_objective:g} s, window {args.latency_window:g} s")  # fmt: skip
    print(f"| figure ({args.repeat} runs: median (min..max)) | value |")
    print("| --- | --- |")
    if not args.latency_only:
        cut = [1 - r["shifted_grams"] / r["now_grams"] for r in runs]
        print(f"| batch of {args.lines} chat lines, submitted 18:00, run now: g CO2e | {spread([r['now_grams'] for r in runs], '{:.4f}')} |")
        print(f"| same batch shifted: g CO2e | {spread([r['shifted_grams'] for r in runs], '{:.4f}')} |")
        print(f"| shifted start (hour of day) | {spread([r['shifted_start_h'] for r in runs], '{:.1f}')} |")
        print(f"| cut by shifting | {spread([c * 100 for c in cut], '{:.1f}')} % |")
    print(f"| interactive p95 alone, ms | {spread([r['p95_alone_ms'] for r in runs], '{:.1f}')} |")
    print(f"| interactive p95 beside a running batch, ms | {spread([r['p95_beside_ms'] for r in runs], '{:.1f}')} |")
    print(f"| p95 change | {spread([w * 100 for w in worse], '{:+.1f}')} % |")
    print(f"| batch lines done per second beside | {spread([r['lines_per_s_beside'] for r in runs], '{:.1f}')} |")
    print(f"| guard breaches while beside | {spread([r['breaches'] for r in runs], '{:.0f}')} |")


if __name__ == "__main__":
    main()
