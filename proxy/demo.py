"""`carbon-proxy demo`: a simulated model server and GPU behind the real proxy, on localhost.

With --traffic it also sends a steady mix of chat, streamed chat and image requests and
prints a small live table of what they cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import aiohttp

from proxy.accounting import Figures
from proxy.carbon.intensity import ConstantIntensity
from proxy.config import config_from_dict
from proxy.exchange import MeteredExchange
from proxy.meters.sim import SimMeter
from proxy.receipts.model import MemoryReceiptStore, Receipt
from proxy.serve import Service
from proxy.sim.config import SimModelConfig
from proxy.sim.gpu import SimGpu
from proxy.sim.server import run_sim_server

DEMO_INTENSITY_G_PER_KWH = 450.0
DEMO_PUE = 1.2
DEMO_TENANTS = ("search", "chat", "batch")


@dataclass
class Tally:
    """Running totals of final receipts, for the live table."""

    requests: int = 0
    joules: float = 0.0
    grams: float = 0.0
    output_tokens: int = 0
    images: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, receipt: Receipt, figures: Figures | None, exchange: MeteredExchange) -> None:
        if receipt.status != "final":
            return
        self.requests += 1
        self.joules += receipt.energy_joules
        self.grams += receipt.co2e_grams
        self.output_tokens += receipt.output_tokens or 0
        self.images += receipt.images


def _banner(proxy_url: str, admin_url: str, sim_url: str) -> str:
    return f"""
carbon-proxy demo: a simulated GPU and model server behind the proxy
  proxy     {proxy_url}          (point your client's base URL here)
  live      {admin_url}/          (the live page: open it in a browser)
  metrics   {admin_url}/metrics
  sim       {sim_url}            (the model server, direct)

Try it:
  curl -si {proxy_url}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model":"sim-llm","messages":[{{"role":"user","content":"Hello"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{proxy_url}/v1", api_key="demo")
  raw = client.chat.completions.with_raw_response.create(
      model="sim-llm", messages=[{{"role": "user", "content": "Hello"}}])
  print(raw.headers["X-CO2e-Grams"], raw.parse().choices[0].message.content)

Press Ctrl-C to stop.
"""


async def _traffic(proxy_url: str, stop: asyncio.Event, concurrency: int = 4) -> None:
    rng = random.Random(7)
    prompts = ["Summarise the SCI standard.", "Write a haiku about GPUs. " * 3, "Explain PUE " * 20]

    async def one(session: aiohttp.ClientSession) -> None:
        roll = rng.random()
        if roll < 0.08:
            url, body = "/v1/images/generations", {"prompt": "a wind farm at dawn", "n": 1, "size": "512x512"}
        else:
            url = "/v1/chat/completions"
            body = {"model": "sim-llm", "messages": [{"role": "user", "content": rng.choice(prompts)}], "max_tokens": rng.randint(16, 96)}
            if roll < 0.6:
                body["stream"] = True
        headers = {"X-Tenant-Id": rng.choice(DEMO_TENANTS)}
        async with session.post(proxy_url + url, json=body, headers=headers) as response:
            await response.read()

    async def worker() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                with contextlib.suppress(aiohttp.ClientError):
                    await one(session)
                await asyncio.sleep(rng.uniform(0.05, 0.4))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _table(tally: Tally, stop: asyncio.Event, every_seconds: float = 5.0) -> None:
    print(f"{'time':>8} {'requests':>9} {'J/request':>10} {'g CO2e':>10} {'g/1k tokens':>12} {'images':>7}")
    started = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_seconds)
        per_request = tally.joules / tally.requests if tally.requests else 0.0
        per_1k = tally.grams / tally.output_tokens * 1000 if tally.output_tokens else 0.0
        print(
            f"{time.monotonic() - started:>7.0f}s {tally.requests:>9} {per_request:>10.2f} {tally.grams:>10.4f} {per_1k:>12.4f} {tally.images:>7}",
            flush=True,
        )


async def run_demo(
    *, port: int = 8080, admin_port: int = 9464, sim_port: int = 8000, traffic: bool = False, duration_seconds: float | None = None
) -> None:
    gpu = SimGpu(("0",), refresh_seconds=0.1)
    sim = await run_sim_server("127.0.0.1", sim_port, SimModelConfig(), gpu)
    config = config_from_dict(
        {
            "server": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}"},
            "upstreams": [
                {"name": "sim-diffusion", "url": sim.url, "dialect": "diffusion", "routes": ["/v1/images/", "/sdapi/"], "devices": ["0"]},
                {"name": "sim-llm", "url": sim.url, "dialect": "openai", "devices": ["0"]},
            ],
            "carbon": {"intensity": DEMO_INTENSITY_G_PER_KWH, "pue": DEMO_PUE},
            "tenants": {"header": "X-Tenant-Id", "allow": list(DEMO_TENANTS)},
        }
    )
    service = Service(config, meter=SimMeter(gpu), intensity=ConstantIntensity(DEMO_INTENSITY_G_PER_KWH), receipts=MemoryReceiptStore())
    try:
        await service.start()
    except OSError as exc:
        await sim.close()
        print(f"carbon-proxy demo: cannot listen: {exc} (use --port/--admin-port/--sim-port)", file=sys.stderr)
        raise SystemExit(2) from None
    proxy_url = f"http://127.0.0.1:{service.public_port}"
    print(_banner(proxy_url, f"http://127.0.0.1:{service.admin_port}", sim.url), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration_seconds is not None:
        loop.call_later(duration_seconds, stop.set)
    tasks = []
    if traffic:
        tally = Tally()
        service.proxy.on_record(tally.add)
        tasks = [asyncio.create_task(_traffic(proxy_url, stop)), asyncio.create_task(_table(tally, stop))]
    await stop.wait()
    print("\nstopping...", flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)
    await service.stop()
    await sim.close()
