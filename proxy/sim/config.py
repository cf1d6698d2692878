"""What the simulated model server looks like from outside: speed, batching, defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SimModelConfig:
    model: str = "sim-llm"
    """Model name reported by every dialect (and accepted whatever the client asks for)."""
    tokens_per_second: float = 50.0
    """Decode speed of one stream when it decodes alone (one token per decode step)."""
    prefill_seconds_per_token: float = 0.0002
    """GPU time to process one prompt token; prompt work of all requests shares the GPU."""
    max_batch: int = 256
    """Sequences decoding at once (vLLM max_num_seqs); the rest queue."""
    max_prefill_tokens_per_step: int = 512
    """Chunked prefill budget per step, so long prompts slow decode steps, not stop them."""
    batch_slowdown: float = 0.1
    """A decode step at full batch takes this fraction longer than at batch 1 (mild)."""
    natural_tokens_min: int = 16
    natural_tokens_max: int = 128
    """Range of the deterministic length a reply has when max_tokens does not cut it."""
    completions_default_max_tokens: int = 16
    """OpenAI /v1/completions default for max_tokens (chat has none)."""
    tgi_default_max_new_tokens: int = 100
    diffusion_seconds_per_step: float = 0.05
    """Denoising time of one step of one 1024x1024 image (scales with pixels and images)."""
    diffusion_default_steps: int = 30
    """Steps used where the API has no steps field (OpenAI images)."""
    embedding_dimensions: int = 64
    seed: int = 0
    """Seeds reply lengths and words together with the prompt text."""
    system_fingerprint: str = "fp_carbon_proxy_sim"

    def __post_init__(self) -> None:
        if self.tokens_per_second <= 0:
            raise ValueError("tokens_per_second must be positive")
        if self.prefill_seconds_per_token < 0 or self.diffusion_seconds_per_step < 0:
            raise ValueError("per-token and per-step times must be non-negative")
        if self.max_batch < 1 or self.max_prefill_tokens_per_step < 1:
            raise ValueError("max_batch and max_prefill_tokens_per_step must be at least 1")
        if not 0 <= self.natural_tokens_min <= self.natural_tokens_max:
            raise ValueError("need 0 <= natural_tokens_min <= natural_tokens_max")
        if self.batch_slowdown < 0:
            raise ValueError("batch_slowdown must be non-negative")

    def decode_step_seconds(self, batch_size: int) -> float:
        """One decode step: 1/tokens_per_second at batch 1, up to (1 + slowdown) x at full batch."""
        base = 1.0 / self.tokens_per_second
        if batch_size <= 1 or self.max_batch <= 1:
            return base
        fill = min(1.0, (batch_size - 1) / (self.max_batch - 1))
        return base * (1.0 + self.batch_slowdown * fill)
