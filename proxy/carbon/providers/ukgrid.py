"""UK Carbon Intensity API (National Grid ESO / NESO): half-hourly, no key.

Shapes (api.carbonintensity.org.uk docs and public clients):
  GET /intensity ->
    {"data": [{"from": "2018-01-20T12:00Z", "to": "2018-01-20T12:30Z",
               "intensity": {"forecast": 266, "actual": 263, "index": "moderate"}}]}
  GET /intensity/{from}/fw24h -> the same "data" list: the half hours from `from` on, 24 h
  ahead, forecasts (with `actual` null where not yet measured)
  GET /regional/intensity/{from}/fw24h/regionid/{id} (or /postcode/{outward code}) ->
    {"data": {"regionid": 13, ..., "data": [ ...half hours... ]}}
  GET /regional/regionid/{1..17} and GET /regional/postcode/{outward code} ->
    {"data": [{"regionid": 13, "shortname": "London", ...,
               "data": [{"from": ..., "to": ..., "intensity": {"forecast": 180, "index": "low"},
                         "generationmix": [...]}]}]}
National `actual` is often null for the current half hour; then the forecast is used and
flagged estimated. Regional figures are forecasts only, so always estimated.
Note: this API uses operational (combustion) emission factors, not life-cycle ones.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from typing import Any

from proxy.carbon.providers.parsing import MalformedResponse, intensity_number, parse_iso8601
from proxy.carbon.providers.polling import IntensityPoint, PollingProvider
from proxy.carbon.table import TableIntensity

log = logging.getLogger("proxy.carbon.intensity")

REGION_IDS = range(1, 18)
"""1 North Scotland ... 14 South East England, 15 England, 16 Scotland, 17 Wales."""

_OUTWARD = re.compile(r"^[A-Z]{1,2}[0-9][A-Z0-9]?$")


def is_northern_ireland(outward: str) -> bool:
    """BT postcodes: Northern Ireland is on the all-island grid (SONI/EirGrid), which the
    GB-only Carbon Intensity API does not cover (its regions are 1..17, all in Great Britain)."""
    return outward.upper().startswith("BT")


def outward_code(postcode: str) -> str | None:
    """The outward part of a UK postcode ('RG10 9AB' -> 'RG10'), or None if it is not one."""
    text = postcode.strip().upper()
    first = text.split()[0] if text else ""
    if len(text.replace(" ", "")) >= 5 and " " not in text:
        first = text[:-3]  # 'RG109AB': the inward code is always 3 characters
    return first if _OUTWARD.match(first) else None


class UkGridProvider(PollingProvider):
    provider_name = "ukgrid"

    DEFAULT_URL = "https://api.carbonintensity.org.uk"
    RESOLUTION_SECONDS = 1800.0
    DEFAULT_POLL_SECONDS = 900.0
    DEFAULT_STALE_AFTER_SECONDS = 2 * 3600.0

    def __init__(
        self,
        *,
        fallback: TableIntensity,
        region_id: int | None = None,
        postcode: str | None = None,
        base_url: str = DEFAULT_URL,
        forecast: bool = False,
        **polling: Any,
    ) -> None:
        if region_id is not None and postcode is not None:
            raise ValueError("give a region id or a postcode, not both")
        if region_id is not None:
            label, path = f"region{region_id}", f"regional/regionid/{region_id}"
            ahead = f"regional/intensity/{{start}}/fw24h/regionid/{region_id}"
        elif postcode is not None:
            code = outward_code(postcode)
            if code is None:
                raise ValueError(f"{postcode!r} is not a UK postcode")
            if is_northern_ireland(code):
                raise ValueError(f"{code!r} is in Northern Ireland, outside the API's coverage (Great Britain only)")
            label, path = f"postcode-{code}", f"regional/postcode/{code}"
            ahead = f"regional/intensity/{{start}}/fw24h/postcode/{code}"
        else:
            label, path = "national", "intensity"
            ahead = "intensity/{start}/fw24h"
        polling.setdefault("poll_seconds", self.DEFAULT_POLL_SECONDS)
        polling.setdefault("stale_after_seconds", self.DEFAULT_STALE_AFTER_SECONDS)
        super().__init__(zone_label=label, fallback=fallback, **polling)
        self._url = f"{base_url.rstrip('/')}/{path}"
        self._forecast_url = f"{base_url.rstrip('/')}/{ahead}"
        self._regional = path != "intensity"
        self.fetch_forecast = forecast

    def _parse(self, body: Any) -> list[IntensityPoint]:
        return parse_regional(body) if self._regional else parse_national(body)

    async def fetch(self) -> list[IntensityPoint]:
        points = self._parse(await self.get_json(self._url))
        if self.fetch_forecast and points:
            newest = max(p.valid_from_unix for p in points)
            start = datetime.fromtimestamp(newest, tz=timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
            try:
                ahead = self._parse(await self.get_json(self._forecast_url.format(start=start)))
            except Exception as exc:  # the forecast is a bonus; the current value still counts
                log.debug("ukgrid forecast for %s unavailable: %s", self.zone_label, type(exc).__name__)
            else:
                points += [p for p in ahead if p.valid_from_unix > newest]
        return points


def _periods(items: Any) -> list[IntensityPoint]:
    if not isinstance(items, list):
        raise MalformedResponse("expected a 'data' list")
    points = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("intensity"), dict):
            raise MalformedResponse("period without an 'intensity' object")
        intensity = item["intensity"]
        actual = intensity.get("actual")
        if isinstance(actual, (int, float)) and not isinstance(actual, bool):
            value, estimated = intensity_number(actual, "intensity.actual"), False
        else:
            value, estimated = intensity_number(intensity.get("forecast"), "intensity.forecast"), True
        points.append(IntensityPoint(parse_iso8601(item.get("from")), value, estimated))
    return points


def parse_national(body: Any) -> list[IntensityPoint]:
    if not isinstance(body, dict):
        raise MalformedResponse("expected a JSON object")
    return _periods(body.get("data"))


def parse_regional(body: Any) -> list[IntensityPoint]:
    if not isinstance(body, dict):
        raise MalformedResponse("expected a JSON object")
    data = body.get("data")
    region = data[0] if isinstance(data, list) and data else data
    if not isinstance(region, dict):
        raise MalformedResponse("expected data[0] to describe the region")
    # Regional values are forecasts even when the period has passed.
    return [IntensityPoint(p.valid_from_unix, p.g_per_kwh, True) for p in _periods(region.get("data"))]
