"""GET /metrics (the SimGpu as a DCGM exporter shows it, and the server's own counters as
vLLM names them), /health, and the sim's own /sim/*.

/metrics is what the proxy's `scrape` meter reads in Kubernetes-style setups:
`DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` is a counter in millijoules (integer, refreshed
as the SimGpu's counter refreshes), `DCGM_FI_DEV_POWER_USAGE` a gauge in watts.
/sim/stats and /sim/requests/{request_id} expose counters and per-request ground truth
to benchmarks that run the sim in another process.
"""

from __future__ import annotations

import socket

from aiohttp import web

from proxy.sim.engine import BatchEngine
from proxy.sim.gpu import SimGpu
from proxy.sim.state import SIM_STATE

_HOSTNAME = socket.gethostname()


def _labels(gpu: SimGpu, position: int, device_id: str) -> str:
    model_name = gpu.model_name.replace("\\", "\\\\").replace('"', '\\"')
    return (
        f'gpu="{device_id}",UUID="GPU-sim-{device_id}",pci_bus_id="00000000:{position + 1:02X}:00.0",'
        f'device="nvidia{position}",modelName="{model_name}",Hostname="{_HOSTNAME}"'
    )


def dcgm_exposition(gpu: SimGpu) -> str:
    _, joules_by_device = gpu.counter_sample()
    power_by_device = gpu.power_watts_by_device()
    lines = [
        "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).",
        "# TYPE DCGM_FI_DEV_POWER_USAGE gauge",
    ]
    for position, device_id in enumerate(gpu.device_ids):
        lines.append(f"DCGM_FI_DEV_POWER_USAGE{{{_labels(gpu, position, device_id)}}} {power_by_device[device_id]:.6f}")
    lines += [
        "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).",
        "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter",
    ]
    for position, device_id in enumerate(gpu.device_ids):
        millijoules = int(joules_by_device[device_id] * 1000.0)
        lines.append(f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{_labels(gpu, position, device_id)}}} {millijoules}")
    return "\n".join(lines) + "\n"


def vllm_exposition(engine: BatchEngine, model: str) -> str:
    """The server's own counters as vLLM's /metrics names them: where prefill and decode
    work happened in time, for a proxy that reads them (issue 12 item 7)."""
    label = model.replace("\\", "\\\\").replace('"', '\\"')
    return "\n".join([
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f'vllm:prompt_tokens_total{{model_name="{label}"}} {engine.prompt_tokens_processed}',
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f'vllm:generation_tokens_total{{model_name="{label}"}} {engine.tokens_generated}',
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f'vllm:num_requests_running{{model_name="{label}"}} {engine.running_count}',
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f'vllm:num_requests_waiting{{model_name="{label}"}} {engine.waiting_count}',
    ]) + "\n"  # fmt: skip


async def metrics(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    text = dcgm_exposition(state.gpu) + vllm_exposition(state.scheduler.engine, state.config.model)
    return web.Response(text=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def health(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def stats(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    gpu = state.gpu
    engine = state.scheduler.engine
    body: dict[str, object] = dict(state.stats.as_dict())
    body.update(
        waiting=engine.waiting_count,
        running=engine.running_count,
        steps=engine.steps,
        tokens_generated=engine.tokens_generated,
        scheduler_lag_seconds_max=state.scheduler.lag_seconds_max,
        energy_joules=gpu.energy_joules(),
        idle_joules=gpu.idle_joules,
        power_watts=gpu.power_watts(),
    )
    return web.json_response(body)


async def ground_truth(request: web.Request) -> web.StreamResponse:
    gpu = request.app[SIM_STATE].gpu
    request_id = request.match_info["request_id"]
    if not gpu.is_known(request_id):
        return web.json_response({"error": f"unknown request id {request_id!r}"}, status=404)
    energy = gpu.ground_truth(request_id)
    return web.json_response({
        "request_id": request_id,
        "present": gpu.is_present(request_id),
        "dynamic_joules": energy.dynamic_joules,
        "static_joules": energy.static_joules,
        "total_joules": energy.total_joules,
    })  # fmt: skip
