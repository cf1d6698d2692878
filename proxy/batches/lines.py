"""Reading a batch input file: one request per JSONL line, each checked as OpenAI checks it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.batches.store_base import Line

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_REPORTED_ERRORS = 100
MAX_CUSTOM_ID_CHARS = 512


@dataclass(slots=True)
class Parsed:
    lines: list[Line] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI's `errors.data` entries: code, message, param, line (1-based)."""


def _error(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def parse_input(content: bytes, endpoint: str, max_lines: int) -> Parsed:
    parsed = Parsed()
    seen: set[str] = set()
    raw_lines = [l for l in content.splitlines() if l.strip()]
    if not raw_lines:
        parsed.errors.append(_error("empty_file", "the input file has no request lines", None))
        return parsed
    if len(raw_lines) > max_lines:
        message = f"the input file has {len(raw_lines)} requests; the limit is {max_lines} (batches.max_lines)"
        parsed.errors.append(_error("too_many_requests", message, None))
        return parsed
    for number, raw in enumerate(raw_lines, start=1):
        problem = _check(raw, number, endpoint, seen)
        if isinstance(problem, dict):
            if len(parsed.errors) < MAX_REPORTED_ERRORS:
                parsed.errors.append(problem)
        else:
            parsed.lines.append(problem)
    return parsed


def _check(raw: bytes, number: int, endpoint: str, seen: set[str]) -> Line | dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error("invalid_json_line", "this line is not valid JSON", number)
    if not isinstance(data, dict):
        return _error("invalid_json_line", "this line is not a JSON object", number)
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return _error("invalid_custom_id", f"custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters", number, "custom_id")
    if custom_id in seen:
        return _error("duplicate_custom_id", f"custom_id {custom_id!r} appears more than once", number, "custom_id")
    seen.add(custom_id)
    if data.get("method") != "POST":
        return _error("invalid_method", "method must be \"POST\"", number, "method")
    if data.get("url") != endpoint:
        return _error("mismatched_url", f"url must be the batch's endpoint {endpoint!r}", number, "url")
    body = data.get("body")
    if not isinstance(body, dict):
        return _error("invalid_body", "body must be a JSON object (the request)", number, "body")
    if body.get("stream"):
        return _error("invalid_body", "streaming is not supported in a batch", number, "body.stream")
    return Line(number, custom_id, orjson.dumps(body))
