"""Change a JSON request body by inserting bytes, never by re-serialising it.

A parse-and-dump round trip is not neutral: `123456789012345678901234567890` becomes a
float, `1e0` becomes `1.0`, duplicate keys collapse, key order and spacing change. The
upstream must get the client's bytes, plus only what the proxy needs to add.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_INCLUDE_USAGE = b'"include_usage":true'
_STREAM_OPTIONS = b'"stream_options":{' + _INCLUDE_USAGE + b"},"
_WHITESPACE = b" \t\r\n"
# Strings (with their escapes) and the structural characters: numbers and literals are
# skipped, so a scan costs one regex pass and a step per string or bracket.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]', re.DOTALL)


def with_include_usage(body: bytes, data: dict[str, Any]) -> bytes | None:
    """`body` (whose parse is `data`) asking for `stream_options.include_usage`, by
    insertion; None when nothing can or should be inserted (the client already chose,
    or `stream_options` is not an object)."""
    if "stream_options" not in data:
        start = _first_non_space(body, 0)
        if start < 0 or body[start] != ord("{"):
            return None
        # A streaming request has at least `"stream": true`: a comma always follows.
        return body[: start + 1] + _STREAM_OPTIONS + body[start + 1 :]
    options = data["stream_options"]
    if not isinstance(options, dict) or "include_usage" in options:
        return None
    # Duplicate keys: the parser kept the last `stream_options`, so that one gets it.
    at = _last_value_start(body, b"stream_options")
    if at < 0 or body[at] != ord("{"):
        return None
    inner = _INCLUDE_USAGE + (b"," if options else b"")
    return body[: at + 1] + inner + body[at + 1 :]


def _first_non_space(body: bytes, at: int) -> int:
    end = len(body)
    while at < end and body[at] in _WHITESPACE:
        at += 1
    return at if at < end else -1


def _last_value_start(body: bytes, key: bytes) -> int:
    """Index of the value of the last top-level `key` of a JSON object, or -1."""
    found = -1
    depth = 0
    expect_key = False
    last_key: bytes | None = None
    for match in _TOKEN.finditer(body):
        token = match.group()
        first = token[0]
        if first == 0x22:  # a string
            if depth == 1 and expect_key:
                last_key, expect_key = token, False
        elif first in b"{[":
            depth += 1
            expect_key = depth == 1 and first == 0x7B
        elif first in b"}]":
            depth -= 1
        elif first == 0x3A:  # ':'
            if depth == 1 and last_key is not None and _key_is(last_key, key):
                found = _first_non_space(body, match.end())
            last_key = None
        elif depth == 1:  # ','
            expect_key = True
    return found


def _key_is(token: bytes, key: bytes) -> bool:
    if b"\\" not in token:
        return token[1:-1] == key
    try:  # an escaped spelling (`"stream\u005foptions"`) is the same key to every parser
        return bool(orjson.loads(token) == key.decode())
    except orjson.JSONDecodeError:
        return False
