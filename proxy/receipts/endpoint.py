"""The receipt endpoint: a caller reads its own receipts.

- `GET /carbon-proxy/v1/receipts/{id}`: `id` is a receipt id (X-Carbon-Receipt-Id), or the
  client's own X-Request-Id, looked up within the caller's credential only (the most
  recent match; `?all=1` lists every match). Another credential's receipts answer 404,
  exactly like absent ones, so ids are neither disclosed nor claimable.
- `GET /carbon-proxy/v1/receipts?since=&until=&limit=&after=`: the caller's receipts,
  oldest first, a page at a time (`after` = the `next_after` of the previous page), for
  reconciliation. since/until: unix seconds or ISO 8601 (UTC unless an offset is given).
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from typing import Any, Mapping

import orjson

from proxy.header_guard import RateLimitedLog, where
from proxy.local import LocalEndpoint, LocalRequest, LocalResponse, error_response
from proxy.receipts.model import Receipt, ReceiptQuery, ReceiptStore

log = logging.getLogger("carbon_proxy")

RECEIPTS_PREFIX = "/carbon-proxy/v1/receipts/"
LIST_PATH = RECEIPTS_PREFIX.rstrip("/")
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_MATCHES = 1000
"""Receipts returned by `?all=1` for one client request id."""
MAX_ID_CHARS = 128


class BadQuery(ValueError):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"query parameter {name!r}: {reason}")


def receipts_endpoint(store: ReceiptStore) -> LocalEndpoint:
    log_failure = RateLimitedLog(log)

    async def handle(request: LocalRequest) -> LocalResponse:
        if request.method != "GET":
            return error_response(405, "method_not_allowed", "receipts are read with GET")
        try:
            if request.path == LIST_PATH:
                return await _page(store, request)
            return await _one(store, request, request.path[len(RECEIPTS_PREFIX) :])
        except BadQuery as exc:
            return error_response(400, "invalid_request", str(exc))
        except Exception as exc:
            # Once per interval, no traceback: a store that is down fails every lookup.
            log_failure(logging.ERROR, "receipt lookup failed (%s)", where(exc))
            return error_response(503, "receipts_unavailable", "the receipt store is not available right now")

    return LocalEndpoint(RECEIPTS_PREFIX, handle)


async def _one(store: ReceiptStore, request: LocalRequest, wanted: str) -> LocalResponse:
    caller = request.credential_hash
    every = _flag(request.query, "all")
    not_found = error_response(404, "receipt_not_found", f"no receipt {wanted[:MAX_ID_CHARS]!r} for this credential")
    if not wanted or len(wanted) > MAX_ID_CHARS or not wanted.isprintable():
        return not_found  # no id of ours or of a sane client looks like this
    failed: Exception | None = None
    try:
        receipt = await store.get(wanted)
    except Exception as exc:
        receipt, failed = None, exc  # the store may still answer from its queue by client id
    if receipt is not None and receipt.credential_hash == caller:
        return _json([receipt.public()] if every else receipt.public(), every)
    matches = await store.find(caller, wanted, MAX_MATCHES if every else 1)
    if matches:
        return _json([m.public() for m in matches] if every else matches[0].public(), every)
    if failed is not None:
        raise failed  # not "not found": the store could not say (503, logged once)
    if caller is None:  # nothing made without a credential: maybe it was made with one
        return error_response(401, "authentication_required", "send the credential that made the request")
    # Same answer for 'absent' and 'not yours': ids of others are not disclosed.
    return not_found


async def _page(store: ReceiptStore, request: LocalRequest) -> LocalResponse:
    if request.credential_hash is None:
        return error_response(401, "authentication_required", "send the credential whose receipts to list")
    query = ReceiptQuery(
        credential_hash=request.credential_hash,
        since_unix=_time(request.query, "since"),
        until_unix=_time(request.query, "until"),
        after=_after(request.query),
        limit=_limit(request.query),
    )
    receipts: list[Receipt] = await store.list(query)
    full = len(receipts) == query.limit
    body = {
        "receipts": [r.public() for r in receipts],
        "next_after": receipts[-1].receipt_id if full else None,
    }
    return LocalResponse(200, orjson.dumps(body))


def _json(data: Any, listing: bool) -> LocalResponse:
    return LocalResponse(200, orjson.dumps({"receipts": data} if listing else data))


def _flag(query: Mapping[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("1", "true", "yes")


def _time(query: Mapping[str, str], name: str) -> float | None:
    text = query.get(name)
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise BadQuery(name, f"expected unix seconds or an ISO 8601 time, got {text[:64]!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    if not math.isfinite(value):
        raise BadQuery(name, f"expected a finite time, got {text[:64]!r}")
    return value


def _limit(query: Mapping[str, str]) -> int:
    text = query.get("limit")
    if text is None or text == "":
        return DEFAULT_PAGE
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise BadQuery("limit", f"expected a whole number from 1 to {MAX_PAGE}, got {text[:64]!r}")
    return int(text)


def _after(query: Mapping[str, str]) -> str | None:
    text = query.get("after")
    if text is None or text == "":
        return None
    if len(text) > MAX_ID_CHARS or not text.isprintable():
        raise BadQuery("after", "expected a receipt id (the next_after of the previous page)")
    return text
