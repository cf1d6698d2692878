"""Small parsers shared by the providers: timestamps, Retry-After, .NET TimeSpan, numbers."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

LBS_PER_MWH_TO_G_PER_KWH = 0.45359237
"""1 lb = 453.59237 g and 1 MWh = 1000 kWh, so g/kWh = lbs/MWh x 0.45359237."""

MAX_PLAUSIBLE_G_PER_KWH = 3000.0
"""No grid is dirtier than pure lignite (~1,100-1,300 g/kWh life cycle); far above that is a unit error."""


class MalformedResponse(ValueError):
    """The provider answered 2xx, but not with the shape we know."""


def parse_iso8601(text: Any) -> float:
    """Unix seconds from ISO 8601 with Z or an offset ('2018-01-20T12:00Z', '...000Z', '+00:00')."""
    if not isinstance(text, str) or not text:
        raise MalformedResponse(f"expected a timestamp, got {type(text).__name__}")
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    # Python 3.11 accepts most ISO forms; .NET's 7-digit fractions need trimming to 6.
    value = re.sub(r"(\.\d{6})\d+", r"\1", value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedResponse(f"unreadable timestamp {text[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def format_iso8601(unix_seconds: float) -> str:
    return datetime.fromtimestamp(unix_seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_retry_after(value: str | None, now_unix: float) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now_unix)


_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})(?:\.\d+)?$")


def parse_timespan_seconds(value: Any) -> float | None:
    """A .NET TimeSpan ('00:05:00', '1.00:00:00') or a number of seconds; None when absent."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if value > 0 else None
    if isinstance(value, str):
        match = _TIMESPAN.match(value.strip())
        if match:
            days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
            total = days * 86400 + hours * 3600 + minutes * 60 + seconds
            return float(total) if total > 0 else None
    return None


def intensity_number(value: Any, what: str) -> float:
    """A finite, non-negative, plausible g/kWh figure, else MalformedResponse."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedResponse(f"{what} is not a number")
    number = float(value)
    if not math.isfinite(number) or number < 0 or number > MAX_PLAUSIBLE_G_PER_KWH:
        raise MalformedResponse(f"{what} = {number!r} is outside 0..{MAX_PLAUSIBLE_G_PER_KWH:g} g/kWh")
    return number


def lbs_per_mwh_to_g_per_kwh(lbs_per_mwh: float) -> float:
    return lbs_per_mwh * LBS_PER_MWH_TO_G_PER_KWH
