"""A simulated model server and accelerator for the demo, the tests and the benchmarks."""

from proxy.sim.clock import VirtualClock
from proxy.sim.config import SimModelConfig
from proxy.sim.gpu import RequestEnergy, SimGpu
from proxy.sim.power import PowerModel

__all__ = ["PowerModel", "RequestEnergy", "SimGpu", "SimModelConfig", "VirtualClock"]
