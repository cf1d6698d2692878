"""A real llama.cpp engine for tests: llama-cpp-python's OpenAI-compatible server,
started as a subprocess on a free loopback port with the tiny model of tiny_model.py.

Locally the tests skip (with the reason) when llama-cpp-python[server] or gguf is not
installed; under CI (the CI environment variable set) they fail instead, so CI can
never pass by skipping them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

STARTUP_SECONDS = 60.0


def require_engine() -> None:
    missing = []
    for module in ("llama_cpp", "llama_cpp.server", "gguf", "uvicorn", "sse_starlette"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        reason = f"llama-cpp-python[server] and gguf are needed (missing: {', '.join(missing)}; pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the real-engine tests, not skip them", pytrace=False)
        pytest.skip(reason)


def free_port() -> int:
    # The server takes a fixed --port: ask the OS for a free one (a small race with other
    # processes, which the startup check below reports clearly if it is ever lost).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    def __init__(self, model_path: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")
        self._process = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server",
                "--model", str(model_path),
                "--model_alias", "tiny-llama",
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--n_ctx", "512",
                "--n_threads", "1",
                "--seed", "1234",
                # Its default cuts a running stream short when another request arrives;
                # queued requests keep every answer whole, so concurrency can be compared.
                "--interrupt_requests", "False",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._log_path = log_path
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self._process.returncode}: {self._log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer within {STARTUP_SECONDS:.0f} s: {self._log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()
