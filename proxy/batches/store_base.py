"""What the Batch API needs from its store (SQLite on one proxy, PostgreSQL in a fleet).

The runner, the endpoints, the service and the CLI use only `BatchStoreLike`; the two
stores (proxy.batches.store, proxy.batches.pg_store) implement it and pass the same
contract tests. The records they keep are the plain classes below.
"""

from __future__ import annotations

import hashlib
import secrets
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Callable, Protocol


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def derived_id(prefix: str, name: str) -> str:
    """The same id each time for the same name: a batch's output file written again (its
    finalizing interrupted by a crash, or a lost lease) replaces the first, never adds one."""
    return f"{prefix}-{hashlib.sha256(name.encode()).hexdigest()[:24]}"


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    created_at: int

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass(frozen=True, slots=True)
class Line:
    line_no: int
    custom_id: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Result:
    line_no: int
    ok: bool
    record: bytes
    """One JSONL line of the output (ok) or error file, without its newline."""
    ran_at: float
    grams: float
    counterfactual_grams: float
    """What the line would have emitted at the intensity of the batch's submission."""
    receipt_id: str | None = None


class BatchStoreLike(Protocol):
    shared: bool
    """True when other replicas use the same store (they may take over a batch)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    # files: scoped to their owner (the credential hash); another owner sees None/False
    async def add_file(self, file: StoredFile, content: bytes) -> None:
        """Replaces a file of the same id and owner; ValueError for another owner's id."""
        ...

    async def file(self, file_id: str, owner: str) -> StoredFile | None: ...
    async def list_files(self, owner: str, purpose: str | None, after: str | None, limit: int) -> list[StoredFile]: ...
    async def file_content(self, file_id: str, owner: str) -> bytes | None: ...
    async def delete_file(self, file_id: str, owner: str) -> bool: ...

    # batches: the OpenAI batch object as a dict, plus its owner and tenant
    async def add_batch(self, batch: dict[str, Any], owner: str, tenant: str, lines: list[Line]) -> None: ...
    async def add_lines(self, batch: dict[str, Any], lines: list[Line]) -> None:
        """A validated batch's lines and its new record (in_progress), together or not at all."""
        ...

    async def batch(self, batch_id: str, owner: str | None = None) -> dict[str, Any] | None: ...
    async def owner_of(self, batch_id: str) -> tuple[str, str] | None: ...
    async def save_batch(self, batch: dict[str, Any], ended_at: float | None = None) -> None:
        """Writes the record; once the batch has ended, only a save that ends it does."""
        ...

    async def list_batches(self, owner: str, after: str | None, limit: int) -> list[dict[str, Any]]: ...
    async def all_batches(self) -> list[dict[str, Any]]: ...
    async def unfinished(self) -> list[str]:
        """Unfinished batches this process may run now (in a fleet: none leased by another)."""
        ...

    def lease(self, batch_id: str, on_cancel: Callable[[], None]) -> AbstractAsyncContextManager[bool]:
        """Hold the right to run a batch's lines while inside; yields False when another
        replica holds it. `on_cancel` is called when another replica cancels the batch."""
        ...

    # lines and results: one result per (batch, line), the first one kept
    async def pending_lines(self, batch_id: str) -> list[Line]: ...
    async def add_result(self, batch_id: str, result: Result) -> bool: ...
    async def add_results(self, batch_id: str, results: list[Result]) -> None: ...
    async def count_results(self, batch_id: str) -> tuple[int, int]: ...
    async def results(self, batch_id: str) -> list[Result]: ...
    async def update_grams(self, batch_id: str, line_no: int, grams: float, counterfactual_grams: float) -> None: ...
    async def forget_lines(self, batch_id: str) -> None: ...
    async def expire(self, before_unix: float) -> int: ...
