"""Dialects read work units from what crosses the wire; nothing else."""

from __future__ import annotations

from proxy.dialects.base import Dialect, RequestInfo, ResponseReader, Work
from proxy.dialects.diffusion import DiffusionDialect
from proxy.dialects.native import LlamaCppDialect, OllamaDialect, TgiDialect
from proxy.dialects.openai import OpenAIDialect

_DIALECTS: dict[str, Dialect] = {
    "openai": OpenAIDialect(),
    "tgi": TgiDialect(),
    "ollama": OllamaDialect(),
    "llamacpp": LlamaCppDialect(),
    "diffusion": DiffusionDialect(),
    "generic": Dialect(),
}


def dialect_for(name: str, path: str) -> Dialect:
    """The dialect of an upstream; OpenAI-style paths on any LLM server speak OpenAI."""
    if name in ("tgi", "ollama", "llamacpp") and path.startswith("/v1/"):
        return _DIALECTS["openai"]
    return _DIALECTS[name]


__all__ = ["Dialect", "RequestInfo", "ResponseReader", "Work", "dialect_for"]
