"""The receipt record and the store interface."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, Sequence


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
    host_energy_joules: float | None = None
    """The host's (CPU, DRAM) share inside energy_joules; None while no host meter runs."""
    cached_tokens: int | None = None
    """Prompt tokens served from the server's prefix cache (inside prompt_tokens; not
    charged as prefill work). None when the server does not say."""

    @property
    def device_energy_joules(self) -> float:
        """The accelerators' part of energy_joules."""
        return self.energy_joules - (self.host_energy_joules or 0.0)

    @property
    def finished_unix(self) -> float:
        return self.started_unix + self.duration_seconds

    def public(self) -> dict[str, Any]:
        """What the receipt endpoint returns (the credential hash stays inside)."""
        data = asdict(self)
        data.pop("credential_hash")
        data["device_energy_joules"] = self.device_energy_joules
        data["finished_unix"] = self.finished_unix
        return data


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Receipt))
"""Column order of the receipts table and of stored rows: Receipt(*row) rebuilds one."""


def period_keys(unix_seconds: float) -> tuple[str, str]:
    """The budget periods a request started in: ('day:YYYY-MM-DD', 'month:YYYY-MM'), UTC."""
    t = time.gmtime(unix_seconds)
    return f"day:{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", f"month:{t.tm_year:04d}-{t.tm_mon:02d}"


class ReceiptStore(Protocol):
    async def start(self) -> None: ...

    def put(self, receipt: Receipt) -> None:
        """Queue a receipt (new or updated to final). Never blocks, never raises."""
        ...

    async def get(self, request_id: str) -> Receipt | None: ...

    async def written(self, request_id: str, timeout_seconds: float) -> bool:
        """Wait (at most timeout_seconds) until the receipt queued for request_id is on
        disk. True when it is (or nothing is queued for it); False when the store is
        failing or slow: the caller goes on regardless."""
        ...

    async def tenant_usage_grams(self, periods: Sequence[str]) -> dict[tuple[str, str], float]:
        """CO2e grams per (tenant, period) for period keys such as 'day:2024-05-01' or
        'month:2024-05' (UTC, by request start): budgets reload their state from it."""
        ...

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

    async def written(self, request_id: str, timeout_seconds: float) -> bool:
        return True

    async def tenant_usage_grams(self, periods: Sequence[str]) -> dict[tuple[str, str], float]:
        wanted = set(periods)
        usage: dict[tuple[str, str], float] = {}
        for receipt in self._receipts.values():
            for period in period_keys(receipt.started_unix):
                if period in wanted:
                    key = (receipt.tenant, period)
                    usage[key] = usage.get(key, 0.0) + receipt.co2e_grams
        return usage

    async def close(self) -> None:
        return None
