"""The receipt record and the store interface."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class Receipt:
    request_id: str
    credential_hash: str | None
    """sha256 of the credential that made the request; never the credential itself."""
    tenant: str
    upstream: str
    model: str | None
    dialect: str
    method: str
    path: str
    status_code: int
    outcome: str
    """ok, upstream_error, upstream_timeout, client_disconnected..."""
    started_unix: float
    duration_seconds: float
    time_to_first_byte_seconds: float | None
    prompt_tokens: int | None
    output_tokens: int | None
    work_units: float | None
    images: int
    energy_joules: float
    pue: float
    intensity_g_per_kwh: float
    operational_grams: float
    embodied_grams: float
    co2e_grams: float
    basis: str
    status: str
    """provisional or final."""

    def public(self) -> dict[str, Any]:
        """What the receipt endpoint returns (the credential hash stays inside)."""
        data = asdict(self)
        data.pop("credential_hash")
        return data


class ReceiptStore(Protocol):
    async def start(self) -> None: ...

    def put(self, receipt: Receipt) -> None:
        """Queue a receipt (new or updated to final). Never blocks, never raises."""
        ...

    async def get(self, request_id: str) -> Receipt | None: ...

    async def close(self) -> None:
        """Flush everything queued."""
        ...


class MemoryReceiptStore:
    """Receipts in memory, bounded: for tests and `receipts.path = ":memory:"`."""

    def __init__(self, max_receipts: int = 100_000) -> None:
        self._receipts: dict[str, Receipt] = {}
        self._max = max_receipts

    async def start(self) -> None:
        return None

    def put(self, receipt: Receipt) -> None:
        self._receipts.pop(receipt.request_id, None)
        self._receipts[receipt.request_id] = receipt
        while len(self._receipts) > self._max:
            self._receipts.pop(next(iter(self._receipts)))

    async def get(self, request_id: str) -> Receipt | None:
        return self._receipts.get(request_id)

    async def close(self) -> None:
        return None
