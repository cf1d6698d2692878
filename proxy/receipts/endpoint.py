"""GET /carbon-proxy/v1/receipts/{id}: a caller reads its own receipts."""

from __future__ import annotations

import logging

import orjson

from proxy.header_guard import RateLimitedLog, where
from proxy.local import LocalEndpoint, LocalRequest, LocalResponse, error_response
from proxy.receipts.model import ReceiptStore

log = logging.getLogger("carbon_proxy")

RECEIPTS_PREFIX = "/carbon-proxy/v1/receipts/"


def receipts_endpoint(store: ReceiptStore) -> LocalEndpoint:
    log_failure = RateLimitedLog(log)

    async def handle(request: LocalRequest) -> LocalResponse:
        if request.method != "GET":
            return error_response(405, "method_not_allowed", "receipts are read with GET")
        request_id = request.path[len(RECEIPTS_PREFIX) :]
        try:
            receipt = await store.get(request_id)
        except Exception as exc:
            # Once per interval, no traceback: a store that is down fails every lookup.
            log_failure(logging.ERROR, "receipt lookup failed (%s)", where(exc))
            return error_response(503, "receipts_unavailable", "the receipt store is not available right now")
        caller = request.credential_hash
        if receipt is not None and receipt.credential_hash is not None and caller is None:
            return error_response(401, "authentication_required", "send the credential that made the request")
        if receipt is None or receipt.credential_hash != caller:
            # Same answer for 'absent' and 'not yours': ids of others are not disclosed.
            return error_response(404, "receipt_not_found", f"no receipt {request_id!r} for this credential")
        return LocalResponse(200, orjson.dumps(receipt.public()))

    return LocalEndpoint(RECEIPTS_PREFIX, handle)
