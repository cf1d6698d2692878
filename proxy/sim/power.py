"""How much dynamic power a unit of accelerator work draws (the sim's physics).

All figures are per device; a tensor-parallel group of N devices draws N times as much
for the same logical work, because every device runs its shard of every step.

The shape follows what published measurements of LLM serving show:
- Decode is memory-bound: one sequence already streams all the weights each step, so
  adding sequences to the batch costs little extra power. Dynamic decode power grows
  sublinearly with batch size: ``decode_watts_at_batch_1 * batch ** decode_batch_exponent``
  (defaults: 50 W at batch 1, ~340 W at batch 64, ~610 W at batch 256).
- Prefill is compute-bound: power is proportional to the prompt tokens processed per
  second, ``prefill_joules_per_token * tokens_per_second`` (0.1 J/token: a prefill
  running at 5,000 tokens/s draws 500 W).
- Diffusion denoising saturates the compute units quickly; power grows weakly with the
  megapixels being denoised at once: ``diffusion_watts_at_1_megapixel * megapixels ** 0.3``.

The accelerator caps the sum at its board power limit (``SimGpu.max_power_watts``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PowerModel:
    decode_watts_at_batch_1: float = 50.0
    decode_batch_exponent: float = 0.45
    prefill_joules_per_token: float = 0.1
    diffusion_watts_at_1_megapixel: float = 450.0
    diffusion_megapixel_exponent: float = 0.3

    def __post_init__(self) -> None:
        if self.decode_watts_at_batch_1 < 0 or self.prefill_joules_per_token < 0:
            raise ValueError("power model coefficients must be non-negative")
        if not 0.0 <= self.decode_batch_exponent <= 1.0:
            raise ValueError("decode_batch_exponent must be in [0, 1] (sublinear or linear)")

    def decode_watts(self, batch_size: int) -> float:
        """Dynamic watts per device while `batch_size` sequences decode together."""
        if batch_size <= 0:
            return 0.0
        return self.decode_watts_at_batch_1 * batch_size**self.decode_batch_exponent

    def prefill_watts(self, tokens_per_second: float) -> float:
        """Dynamic watts per device while prompt tokens are processed at this rate."""
        return self.prefill_joules_per_token * max(0.0, tokens_per_second)

    def diffusion_watts(self, megapixels: float) -> float:
        """Dynamic watts per device while this many megapixels are denoised at once."""
        if megapixels <= 0:
            return 0.0
        return self.diffusion_watts_at_1_megapixel * megapixels**self.diffusion_megapixel_exponent
