"""Sending one batch line through the proxy's own public listener (the metered path).

Each line is a loopback HTTP request, so it is routed, metered, receipted and budgeted
exactly like a client's. The caller's credential is never stored: the line carries an
internal header the proxy trusts only when it holds this process's random token, naming
the batch owner's credential hash and tenant (proxy.batches.identity reads it back).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Mapping

import aiohttp

BATCH_HEADER = "X-Carbon-Proxy-Batch"
"""`<token>;<credential hash or ->;<tenant>`: dropped from every request sent upstream."""


class BatchIdentity:
    """The token that makes BATCH_HEADER trusted; new per process, never logged."""

    def __init__(self) -> None:
        self._token = secrets.token_hex(32)

    def header(self, credential_hash: str, tenant: str) -> str:
        return f"{self._token};{credential_hash or '-'};{tenant}"

    def vouched(self, headers: Mapping[str, str]) -> tuple[str, str | None] | None:
        """(tenant, credential hash) of a line sent by our runner; None for anyone else."""
        value = headers.get(BATCH_HEADER)
        if not value:
            return None
        token, _, rest = value.partition(";")
        if not secrets.compare_digest(token, self._token):
            return None
        credential, _, tenant = rest.partition(";")
        return tenant, (None if credential == "-" else credential)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]


class LineSender:
    def __init__(self, identity: BatchIdentity, host: str, port: int, timeout_seconds: float = 3600.0) -> None:
        self.identity = identity
        self.base = f"http://{host}:{port}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, url: str, body: bytes, credential_hash: str, tenant: str, request_id: str) -> Answer:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {
            "Content-Type": "application/json",
            "X-Request-Id": request_id,
            BATCH_HEADER: self.identity.header(credential_hash, tenant),
        }
        last: Exception | None = None
        for attempt in range(3):  # the listener briefly refusing (a restart) is retried
            try:
                async with self._session.post(self.base + url, data=body, headers=headers) as response:
                    return Answer(response.status, await response.read(), dict(response.headers))
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                last = exc
                await asyncio.sleep(0.5 * (attempt + 1))
        raise ConnectionError(f"the proxy's listener did not answer ({type(last).__name__})")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
