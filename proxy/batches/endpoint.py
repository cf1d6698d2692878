"""The Batch API's HTTP surface on the public listener (OpenAI's paths and wire format).

- `POST /v1/files` (multipart: `purpose=batch`, `file`), `GET /v1/files`, `GET /v1/files/{id}`,
  `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`
- `POST /v1/batches`, `GET /v1/batches` (`after`, `limit`), `GET /v1/batches/{id}`,
  `POST /v1/batches/{id}/cancel`

Everything belongs to the credential that made it: another credential gets 404, exactly
as for an absent id; a request without one gets 401.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import orjson

from proxy.batches.clock import Clock
from proxy.batches.lines import ENDPOINTS
from proxy.batches.multipart import MultipartError, parse_form
from proxy.batches.runner import BatchRunner
from proxy.batches.settings import BatchSettings
from proxy.batches.store_base import BatchStoreLike, StoredFile, new_id
from proxy.header_guard import RateLimitedLog, where
from proxy.local import LocalEndpoint, LocalRequest, LocalResponse, error_response, json_response

log = logging.getLogger("carbon_proxy")

FILES = "/v1/files"
BATCHES = "/v1/batches"
COMPLETION_WINDOW_SECONDS = {"24h": 24 * 3600}
MAX_METADATA_PAIRS = 16
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class BatchApi:
    def __init__(
        self, store: BatchStoreLike, runner: BatchRunner, settings: BatchSettings, clock: Clock, intensity_now: Callable[[], float]
    ) -> None:
        self.store = store
        self.runner = runner
        self.settings = settings
        self.clock = clock
        self._intensity_now = intensity_now
        self._log_failure = RateLimitedLog(log)

    def endpoints(self) -> list[LocalEndpoint]:
        return [
            LocalEndpoint(FILES + "/", self._guarded(self._files), self.settings.max_file_bytes + MULTIPART_OVERHEAD_BYTES),
            LocalEndpoint(BATCHES + "/", self._guarded(self._batches)),
        ]

    def _guarded(self, handler: Callable[[LocalRequest, str], Awaitable[LocalResponse]]) -> Callable[[LocalRequest], Awaitable[LocalResponse]]:
        async def handle(request: LocalRequest) -> LocalResponse:
            if request.credential_hash is None:
                return error_response(401, "authentication_required", "the Batch API needs a credential (Authorization: Bearer ...)")
            try:
                return await handler(request, request.credential_hash)
            except Exception as exc:
                self._log_failure(logging.ERROR, "batch API request failed (%s)", where(exc))
                return error_response(503, "batches_unavailable", "the batch store is not available right now")

        return handle

    # -- files ---------------------------------------------------------------------------

    async def _files(self, request: LocalRequest, owner: str) -> LocalResponse:
        rest = request.path[len(FILES) :].strip("/")
        if not rest:
            if request.method == "GET":
                return await self._list_files(request, owner)
            if request.method != "POST":
                return error_response(405, "method_not_allowed", "files are uploaded with POST and listed with GET")
            return await self._upload(request, owner)
        file_id, _, tail = rest.partition("/")
        if tail == "content" and request.method == "GET":
            content = await self.store.file_content(file_id, owner)
            if content is None:
                return _no_file(file_id)
            return LocalResponse(200, content, content_type="application/octet-stream")
        if tail:
            return error_response(404, "not_found", f"no such path {request.path[:128]!r}")
        if request.method == "GET":
            file = await self.store.file(file_id, owner)
            return json_response(200, file.public()) if file else _no_file(file_id)
        if request.method == "DELETE":
            if not await self.store.delete_file(file_id, owner):
                return _no_file(file_id)
            return json_response(200, {"id": file_id, "object": "file", "deleted": True})
        return error_response(405, "method_not_allowed", "a file is read with GET or removed with DELETE")

    async def _list_files(self, request: LocalRequest, owner: str) -> LocalResponse:
        limit = _limit(request, default=10000, maximum=10000)
        if isinstance(limit, LocalResponse):
            return limit
        page = await self.store.list_files(owner, request.query.get("purpose") or None, request.query.get("after") or None, limit + 1)
        return _page([f.public() for f in page[:limit]], has_more=len(page) > limit)

    async def _upload(self, request: LocalRequest, owner: str) -> LocalResponse:
        try:
            # Up to max_file_bytes: parsed off the event loop.
            form = await asyncio.to_thread(parse_form, request.headers.get("Content-Type", ""), request.body)
        except MultipartError as exc:
            return error_response(400, "invalid_request_error", f"POST /v1/files: {exc}")
        purpose = form.fields.get("purpose")
        if purpose != "batch":
            return error_response(400, "invalid_request_error", f"purpose must be 'batch' (the only one served here), got {purpose!r}")
        if "file" not in form.files:
            return error_response(400, "invalid_request_error", "the form has no 'file' part")
        filename, content = form.files["file"]
        if len(content) > self.settings.max_file_bytes:
            message = f"the file has {len(content)} bytes; the limit is {self.settings.max_file_bytes} (batches.max_file_bytes)"
            return error_response(413, "file_too_large", message)
        file = StoredFile(new_id("file"), owner, purpose, filename[:256] or "upload.jsonl", len(content), int(self.clock.now()))
        await self.store.add_file(file, content)
        return json_response(200, file.public())

    # -- batches -------------------------------------------------------------------------

    async def _batches(self, request: LocalRequest, owner: str) -> LocalResponse:
        rest = request.path[len(BATCHES) :].strip("/")
        if not rest:
            if request.method == "POST":
                return await self._create(request, owner)
            if request.method == "GET":
                return await self._list(request, owner)
            return error_response(405, "method_not_allowed", "batches are created with POST and listed with GET")
        batch_id, _, tail = rest.partition("/")
        if tail == "cancel" and request.method == "POST":
            before = await self.store.batch(batch_id, owner)
            if before is None:
                return _no_batch(batch_id)
            if before["status"] not in ("validating", "in_progress", "cancelling"):
                return error_response(409, "invalid_request_error", f"a batch with status {before['status']!r} cannot be cancelled")
            batch = await self.runner.cancel(batch_id)
            return json_response(200, await self._public(batch or before))
        if tail or request.method != "GET":
            return error_response(404, "not_found", f"no such path {request.path[:128]!r}")
        batch = await self.store.batch(batch_id, owner)
        return json_response(200, await self._public(batch)) if batch else _no_batch(batch_id)

    async def _public(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch["status"] in ("in_progress", "cancelling", "finalizing"):  # live counts from the results
            ok, failed = await self.store.count_results(batch["id"])
            batch["request_counts"] = {**batch["request_counts"], "completed": ok, "failed": failed}
        return batch

    async def _list(self, request: LocalRequest, owner: str) -> LocalResponse:
        limit = _limit(request, default=20, maximum=100)
        if isinstance(limit, LocalResponse):
            return limit
        page = await self.store.list_batches(owner, request.query.get("after") or None, limit + 1)
        return _page([await self._public(b) for b in page[:limit]], has_more=len(page) > limit)

    async def _create(self, request: LocalRequest, owner: str) -> LocalResponse:
        try:
            ask = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return error_response(400, "invalid_request_error", "the body must be a JSON object")
        if not isinstance(ask, dict):
            return error_response(400, "invalid_request_error", "the body must be a JSON object")
        endpoint = ask.get("endpoint")
        if endpoint not in ENDPOINTS:
            return _bad_param("endpoint", f"must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        window = ask.get("completion_window")
        if window not in COMPLETION_WINDOW_SECONDS:
            return _bad_param("completion_window", f"must be '24h', got {window!r}")
        metadata = ask.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= MAX_METADATA_PAIRS
            and all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items())
        ):
            return _bad_param("metadata", f"must be at most {MAX_METADATA_PAIRS} string pairs (keys 64, values 512 chars)")
        file_id = ask.get("input_file_id")
        file = await self.store.file(file_id, owner) if isinstance(file_id, str) else None
        if file is None:
            return error_response(404, "invalid_request_error", f"no file {str(file_id)[:128]!r} for this credential (input_file_id)")
        if file.purpose != "batch":
            return _bad_param("input_file_id", f"the file's purpose is {file.purpose!r}, not 'batch'")
        now = int(self.clock.now())
        batch: dict[str, Any] = {
            "id": new_id("batch"),
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file.id,
            "completion_window": window,
            "status": "validating",  # the runner checks the input file, off the event loop
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + COMPLETION_WINDOW_SECONDS[window],
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
            "carbon": {
                "submitted_g_per_kwh": round(self._intensity_now(), 3),
                "planned_start_at": None,
                "planned_g_per_kwh": None,
                "emitted_grams": None,
                "run_now_grams": None,
                "avoided_grams": None,
            },
        }
        await self.store.add_batch(batch, owner, request.tenant, [])
        self.runner.submit(batch["id"])
        return json_response(200, batch)


def _bad_param(param: str, message: str) -> LocalResponse:
    body = {"error": {"message": f"{param}: {message}", "type": "invalid_request_error", "param": param, "code": 400}}
    return LocalResponse(400, orjson.dumps(body))


def _no_file(file_id: str) -> LocalResponse:
    return error_response(404, "not_found_error", f"no file {file_id[:128]!r} for this credential")


def _no_batch(batch_id: str) -> LocalResponse:
    return error_response(404, "not_found_error", f"no batch {batch_id[:128]!r} for this credential")


def _limit(request: LocalRequest, *, default: int, maximum: int) -> int | LocalResponse:
    """The `limit` query parameter of a list call, or the 400 that says what is wrong."""
    text = request.query.get("limit", str(default))
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        return error_response(400, "invalid_request_error", f"limit must be a whole number from 1 to {maximum}, got {text[:32]!r}")
    return int(text)


def _page(data: list[dict[str, Any]], *, has_more: bool) -> LocalResponse:
    """One page of an OpenAI list object."""
    body = {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
    return json_response(200, body)
