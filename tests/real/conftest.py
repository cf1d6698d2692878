from __future__ import annotations

from typing import Iterator

import pytest

from .engine import LlamaServer, require_engine


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    require_engine()
    from .tiny_model import write_tiny_llama

    folder = tmp_path_factory.mktemp("llama")
    server = LlamaServer(write_tiny_llama(folder / "tiny-llama.gguf"), folder / "server.log")
    yield server
    server.stop()
