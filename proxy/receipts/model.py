"""The receipt record and the store interface."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, Sequence

from proxy.headers import new_request_id


@dataclass(slots=True)
class Receipt:
    receipt_id: str
    """Proxy-unique (X-Carbon-Receipt-Id): the key of receipts, budgets and reports."""
    request_id: str
    """The client's X-Request-Id (or one the proxy made up): a field, not a key; several
    receipts may share it, and it is only looked up within one credential."""
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
    route: str | None = None
    """X-Carbon-Route as sent, when a pool's policy chose the upstream (proxy.routing)."""
    avoided_grams: float | None = None
    """Predicted grams of the baseline policy's choice minus those of the chosen upstream."""

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


def new_receipt_id(now_unix: float | None = None) -> str:
    """32 hex digits: 48 bits of milliseconds since the epoch, then 80 random bits (the
    layout of a UUIDv7). Unique across processes and hosts without coordination, and
    sorted by time: the receipt listing pages by id."""
    millis = int((time.time() if now_unix is None else now_unix) * 1000) & 0xFFFFFFFFFFFF
    return f"{millis:012x}{new_request_id()[12:]}"


@dataclass(frozen=True, slots=True)
class ReceiptQuery:
    """A caller's own receipts (credential_hash None: those made without a credential),
    started in [since_unix, until_unix), with receipt ids after `after`, oldest first."""

    credential_hash: str | None
    since_unix: float | None = None
    until_unix: float | None = None
    after: str | None = None
    limit: int = 100


class ReceiptStore(Protocol):
    async def start(self) -> None: ...

    def put(self, receipt: Receipt) -> None:
        """Queue a receipt (new or updated to final). Never blocks, never raises."""
        ...

    async def get(self, receipt_id: str) -> Receipt | None: ...

    async def find(self, credential_hash: str | None, request_id: str, limit: int) -> list[Receipt]:
        """Receipts of this credential whose client request id is `request_id`, newest first."""
        ...

    async def list(self, query: ReceiptQuery) -> list[Receipt]: ...

    async def written(self, receipt_id: str, timeout_seconds: float) -> bool:
        """Wait (at most timeout_seconds) until the receipt queued as receipt_id is on
        disk. True when it is (or nothing is queued for it); False when the store is
        failing or slow: the caller goes on regardless."""
        ...

    async def tenant_usage_grams(
        self, periods: Sequence[str], tenants: Sequence[str] | None = None
    ) -> dict[tuple[str, str], float]:
        """CO2e grams per (tenant, period) for period keys such as 'day:2024-05-01' or
        'month:2024-05' (UTC, by request start), for `tenants` (None: all): budgets load
        a tenant's state from it when they first see it."""
        ...

    async def close(self) -> None:
        """Flush everything queued."""
        ...


def matches(receipt: Receipt, query: ReceiptQuery) -> bool:
    """`query` applied to one receipt (stores filter queued rows with it)."""
    return (
        receipt.credential_hash == query.credential_hash
        and (query.since_unix is None or receipt.started_unix >= query.since_unix)
        and (query.until_unix is None or receipt.started_unix < query.until_unix)
        and (query.after is None or receipt.receipt_id > query.after)
    )


class MemoryReceiptStore:
    """Receipts in memory, bounded: for tests and `receipts.path = ":memory:"`."""

    def __init__(self, max_receipts: int = 100_000) -> None:
        self._receipts: dict[str, Receipt] = {}
        self._max = max_receipts
        self.dropped_total = 0
        """Receipts pushed out by the bound (for the dropped-receipts metric)."""

    async def start(self) -> None:
        return None

    def put(self, receipt: Receipt) -> None:
        self._receipts.pop(receipt.receipt_id, None)
        self._receipts[receipt.receipt_id] = receipt
        while len(self._receipts) > self._max:
            self._receipts.pop(next(iter(self._receipts)))
            self.dropped_total += 1

    async def get(self, receipt_id: str) -> Receipt | None:
        return self._receipts.get(receipt_id)

    async def find(self, credential_hash: str | None, request_id: str, limit: int) -> list[Receipt]:
        found = [r for r in self._receipts.values() if r.request_id == request_id and r.credential_hash == credential_hash]
        return sorted(found, key=lambda r: (r.started_unix, r.receipt_id), reverse=True)[:limit]

    async def list(self, query: ReceiptQuery) -> list[Receipt]:
        found = [r for r in self._receipts.values() if matches(r, query)]
        return sorted(found, key=lambda r: r.receipt_id)[: query.limit]

    async def written(self, receipt_id: str, timeout_seconds: float) -> bool:
        return True

    async def tenant_usage_grams(
        self, periods: Sequence[str], tenants: Sequence[str] | None = None
    ) -> dict[tuple[str, str], float]:
        wanted = set(periods)
        who = set(tenants) if tenants is not None else None
        usage: dict[tuple[str, str], float] = {}
        for receipt in self._receipts.values():
            if who is not None and receipt.tenant not in who:
                continue
            for period in period_keys(receipt.started_unix):
                if period in wanted:
                    key = (receipt.tenant, period)
                    usage[key] = usage.get(key, 0.0) + receipt.co2e_grams
        return usage

    async def close(self) -> None:
        return None
