"""The OpenAI-compatible Batch API: deferrable work run in the cleanest window of its deadline."""

from proxy.batches.settings import BatchSettings, parse_batches

__all__ = ["BatchSettings", "parse_batches"]
