"""A simulated model server and accelerator for the demo, the tests and the benchmarks.

`SimGpu` integrates power exactly and keeps per-request ground truth; `create_sim_app`
serves the OpenAI, Ollama, TGI, llama.cpp and diffusion dialects with continuous
batching whose work drives the SimGpu's power.
"""

from proxy.sim.clock import VirtualClock
from proxy.sim.config import SimModelConfig
from proxy.sim.gpu import RequestEnergy, SimGpu
from proxy.sim.power import PowerModel
from proxy.sim.server import SimServer, create_sim_app, run_sim_server, sim_state
from proxy.sim.state import SIM_STATE, SimState, SimStats
from proxy.sim.virtual import VirtualRequest, VirtualRun, VirtualTrace, run_virtual

__all__ = [
    "SIM_STATE",
    "PowerModel",
    "RequestEnergy",
    "SimGpu",
    "SimModelConfig",
    "SimServer",
    "SimState",
    "SimStats",
    "VirtualClock",
    "VirtualRequest",
    "VirtualRun",
    "VirtualTrace",
    "create_sim_app",
    "run_sim_server",
    "run_virtual",
    "sim_state",
]
