"""The proxy's data path with no metering: the public server (proxy.server) and
proxy.forward.Forwarder over the same transport, with an exchange that only passes bytes.

A reference for bench/overhead.py: what forwarding alone costs in one Python process,
so the table separates the price of the process hop from the price of metering.

    python bench/_bare.py --port 8081 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Mapping

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop  # noqa: E402
from multidict import CIMultiDictProxy  # noqa: E402

from proxy.config import Timeouts  # noqa: E402
from proxy.forward import BodyMode, Forwarder  # noqa: E402
from proxy.headers import upstream_request_headers  # noqa: E402
from proxy.server.connections import ConnectionGuard  # noqa: E402
from proxy.server.messages import Reply, Request  # noqa: E402
from proxy.server.protocol import Limits  # noqa: E402
from proxy.server.public import PublicServer  # noqa: E402


class PassThrough:
    """Streams event streams, buffers the rest (as the metered exchange does); adds nothing."""

    def response_started(self, status: int, headers: CIMultiDictProxy[str]) -> BodyMode:
        streaming = headers.get("Content-Type", "").startswith(("text/event-stream", "application/x-ndjson"))
        return BodyMode.STREAM if streaming else BodyMode.BUFFER

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    async def finish(self) -> bytes:
        return b""

    async def complete(self, body: bytes) -> Mapping[str, str]:
        return {}

    def failed(self, reason: str) -> None:
        pass


async def main(port: int, upstream: str) -> None:
    forwarder = Forwarder(max_buffer_bytes=8 << 20)
    timeouts = Timeouts()

    async def handle(request: Request) -> Reply | None:
        if request.path == "/health":
            return Reply(200, b"ok")
        headers = upstream_request_headers(request.headers, client_ip=None, scheme="http", request_id="-", trust_forwarded=False)
        body = await request.body.read() if request.body is not None else None
        return await forwarder.forward(
            request, upstream_url=upstream, target=request.raw_path, headers=headers, body=body,
            timeouts=timeouts, exchange=PassThrough(), extra_headers={},
        )  # fmt: skip

    server = PublicServer(handle, guard=ConnectionGuard(), limits=Limits())
    await server.start("127.0.0.1", port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    await forwarder.close()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvloop.run(main(args.port, args.upstream))
