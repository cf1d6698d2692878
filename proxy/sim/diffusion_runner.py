"""Denoising jobs on the SimGpu: one job at a time, paced per step, stoppable per step.

A job of `images` images of width x height, `steps` steps each, takes
steps x diffusion_seconds_per_step x (width x height / 1024^2) per image: images in one
batch are denoised together (each step costs the batch's pixels), iterations run one
after another. While it runs the job draws the power model's diffusion watts for the
megapixels in its batch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from proxy.sim.config import SimModelConfig
from proxy.sim.gpu import SimGpu


def diffusion_seconds(config: SimModelConfig, steps: int, width: int, height: int, images: int) -> float:
    return steps * config.diffusion_seconds_per_step * (width * height / 1024**2) * images


class DiffusionRunner:
    def __init__(self, config: SimModelConfig, gpu: SimGpu) -> None:
        self.config = config
        self.gpu = gpu
        self._lock = asyncio.Lock()  # AUTOMATIC1111 and friends run one job at a time
        self.steps_done = 0

    async def run(
        self,
        request_id: str,
        *,
        steps: int,
        width: int,
        height: int,
        batch_size: int,
        n_iter: int,
        connection_lost: Callable[[], bool],
    ) -> bool:
        """Denoise; True when every step ran, False when the client left first."""
        async with self._lock:
            megapixels = width * height / 1024**2 * batch_size
            step_seconds = self.config.diffusion_seconds_per_step * megapixels
            self.gpu.set_diffusion(request_id, megapixels)
            try:
                deadline = time.monotonic()
                for _ in range(n_iter * steps):
                    if connection_lost():
                        return False
                    deadline += step_seconds
                    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                    self.steps_done += 1
                return True
            finally:
                self.gpu.set_diffusion(request_id, 0.0)
