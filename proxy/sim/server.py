"""The simulated model server: one aiohttp app speaking every dialect the proxy reads.

    gpu = SimGpu()
    app = create_sim_app(SimModelConfig(tokens_per_second=50), gpu)

    server = await run_sim_server("127.0.0.1", 0, SimModelConfig(), gpu)
    ... server.url ...
    await server.close()

Routes: OpenAI (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models,
/v1/images/generations), AUTOMATIC1111 (/sdapi/v1/txt2img), Ollama (/api/generate,
/api/chat, /api/tags), TGI (/generate, /generate_stream), llama.cpp (/completion), the
SimGpu as a DCGM exporter (/metrics), /health, and the sim's /sim/stats and
/sim/requests/{request_id} (ground truth).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxy.sim import diffusion, llamacpp, metrics, ollama, openai_api, tgi
from proxy.sim.config import SimModelConfig
from proxy.sim.gpu import SimGpu
from proxy.sim.state import SIM_STATE, SimState, SimStats

__all__ = ["SimModelConfig", "SimServer", "create_sim_app", "run_sim_server", "sim_state"]


def create_sim_app(config: SimModelConfig | None = None, gpu: SimGpu | None = None) -> web.Application:
    """A fresh app with its own scheduler; the scheduler runs while the app runs."""
    state = SimState.create(config or SimModelConfig(), gpu or SimGpu())
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIM_STATE] = state

    async def start_scheduler(_: web.Application) -> None:
        state.scheduler.start()

    async def stop_scheduler(_: web.Application) -> None:
        await state.scheduler.close()  # cancels what still runs, so handlers return

    app.on_startup.append(start_scheduler)
    app.on_shutdown.append(stop_scheduler)
    app.on_cleanup.append(stop_scheduler)
    app.add_routes([
        web.post("/v1/chat/completions", openai_api.chat_completions),
        web.post("/v1/completions", openai_api.completions),
        web.post("/v1/embeddings", openai_api.embeddings),
        web.get("/v1/models", openai_api.list_models),
        web.post("/v1/images/generations", diffusion.images_generations),
        web.post("/sdapi/v1/txt2img", diffusion.txt2img),
        web.post("/api/generate", ollama.generate),
        web.post("/api/chat", ollama.chat),
        web.get("/api/tags", ollama.tags),
        web.post("/generate", tgi.generate),
        web.post("/generate_stream", tgi.generate_stream),
        web.post("/completion", llamacpp.completion),
        web.post("/completions", llamacpp.completion),
        web.get("/metrics", metrics.metrics),
        web.get("/health", metrics.health),
        web.get("/sim/stats", metrics.stats),
        web.get("/sim/requests/{request_id}", metrics.ground_truth),
    ])  # fmt: skip
    return app


def sim_state(app: web.Application) -> SimState:
    """The scheduler, SimGpu and counters behind an app made by create_sim_app()."""
    return app[SIM_STATE]


@dataclass(slots=True)
class SimServer:
    """A running sim server; `await close()` stops it."""

    runner: web.AppRunner
    site: web.TCPSite
    app: web.Application
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def state(self) -> SimState:
        return self.app[SIM_STATE]

    @property
    def gpu(self) -> SimGpu:
        return self.state.gpu

    @property
    def stats(self) -> SimStats:
        return self.state.stats

    async def close(self) -> None:
        await self.runner.cleanup()


async def run_sim_server(
    host: str = "127.0.0.1",
    port: int = 0,
    config: SimModelConfig | None = None,
    gpu: SimGpu | None = None,
    *,
    shutdown_timeout_seconds: float = 2.0,
) -> SimServer:
    """Serve a sim app on host:port (0 picks a free port; `SimServer.port` says which)."""
    app = create_sim_app(config, gpu)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout_seconds)
    await runner.setup()
    # Thousands of clients connect at once in the benchmarks; 128 (the default) drops SYNs.
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound_port = runner.addresses[0][1] if runner.addresses else port
    return SimServer(runner=runner, site=site, app=app, host=host, port=bound_port)
