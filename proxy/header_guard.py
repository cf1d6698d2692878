"""Hostile input at the edge: headers the proxy interprets must be text, and nothing a
client sends may turn into a traceback per request.

aiohttp decodes header bytes as UTF-8 with `surrogateescape`: a byte that is not UTF-8
becomes a lone surrogate, which every later `.encode()` (hashing a credential, storing a
tenant in SQLite) rejects. The headers the proxy reads are checked once, up front, and a
bad one gets a JSON 400 that names the header but never echoes its value (it may be a
credential). Headers the proxy only forwards are left alone: they travel byte for byte.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Iterable, Mapping

# Lone surrogates (bytes that were not UTF-8), C0 controls but HTAB, DEL and C1 controls.
_BAD = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")

CREDENTIAL_HEADERS = ("Authorization", "X-Api-Key", "Api-Key")


def headers_read(tenant_header: str | None, trust_forwarded: bool) -> tuple[str, ...]:
    """Every request header whose value the proxy interprets (not just forwards)."""
    names = ["Host", *CREDENTIAL_HEADERS, "X-Request-Id"]
    if tenant_header:
        names.append(tenant_header)
    if trust_forwarded:
        names += ["X-Forwarded-For", "X-Forwarded-Proto"]
    return tuple(dict.fromkeys(names))


def first_bad_header(headers: Mapping[str, str], names: Iterable[str]) -> str | None:
    """The first of `names` with a value (any of its repeats) that is not UTF-8 text or
    holds control characters; None when all are clean."""
    getall = getattr(headers, "getall", None)
    for name in names:
        values = getall(name, ()) if getall is not None else ([headers[name]] if name in headers else [])
        for value in values:
            if _BAD.search(value):
                return name
    return None


def invalid_header_message(name: str) -> str:
    return f"header {name} must be UTF-8 text without control characters"


class RateLimitedLog:
    """One log line per `interval_seconds` at most, with a count of those held back, so a
    client repeating a bad request cannot flood the log."""

    def __init__(self, logger: logging.Logger, interval_seconds: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval_seconds
        self._next_at = 0.0
        self._held = 0

    def __call__(self, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._held += 1
            return
        self._next_at = now + self._interval
        if self._held:
            message += " (%d similar in the last %g s not logged)"
            args = (*args, self._held, self._interval)
            self._held = 0
        self._logger.log(level, message, *args)


def where(exc: BaseException) -> str:
    """`Type at file:line` of the innermost frame: enough to find a bug, no values (they
    may hold a client's secret)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(exc).__name__
    code = tb.tb_frame.f_code
    return f"{type(exc).__name__} at {os.path.basename(code.co_filename)}:{tb.tb_lineno} in {code.co_name}"
