"""Green Software Foundation Carbon Aware SDK WebAPI: GET /emissions/bylocation.

The WebAPI is self-hosted in front of WattTime or Electricity Maps. Its docs give:
  GET /emissions/bylocation?location=eastus&time=2022-01-01T00:00:00Z&toTime=... ->
    [{"location": "eastus", "time": "2022-05-17T20:45:11.5092741+00:00",
      "rating": 70, "duration": "00:05:00"}]
with `rating` in g/kWh. With `forecast = true` it also asks
  GET /emissions/forecasts/current?location=eastus ->
    [{"generatedAt": ..., "location": "eastus", "windowSize": 5, "optimalDataPoints": [...],
      "forecastData": [{"location": "eastus", "timestamp": "...", "duration": 5, "value": 326.8}]}]
(EmissionsForecastDTO / EmissionsDataDTO of the SDK's OpenAPI clients; 501 where the data
source has no forecasts). The WebAPI controller answers 204 No Content when it has no data
for the location and time (no data: the last good value, then the table, polled again at
the normal pace, not a malformed-response back-off), and writes `rating = -1` for a
point without a value (the SDK's null): such points are skipped. Whether the signal is average or marginal depends on the data
source behind your WebAPI (WattTime: marginal), so `marginal` is a setting here.
"""

from __future__ import annotations

import logging
from typing import Any

from proxy.carbon.credentials import Secret
from proxy.carbon.providers.parsing import (
    MalformedResponse,
    format_iso8601,
    intensity_number,
    parse_iso8601,
)
from proxy.carbon.providers.polling import IntensityPoint, NoData, PollingProvider
from proxy.carbon.table import TableIntensity

log = logging.getLogger("proxy.carbon.intensity")


class CarbonAwareSdkProvider(PollingProvider):
    provider_name = "carbonaware"
    credential_hint = "the WebAPI token (carbon.token_env or carbon.token_file)"

    RESOLUTION_SECONDS = 300.0
    DEFAULT_POLL_SECONDS = 300.0
    DEFAULT_STALE_AFTER_SECONDS = 3 * 3600.0
    LOOKBACK_SECONDS = 3600.0
    """Ask for the last hour: enough to hold the newest point of hourly and 5-minute sources."""

    def __init__(
        self,
        location: str,
        *,
        base_url: str,
        fallback: TableIntensity,
        token: Secret | None = None,
        marginal: bool = False,
        forecast: bool = False,
        **polling: Any,
    ) -> None:
        polling.setdefault("poll_seconds", self.DEFAULT_POLL_SECONDS)
        polling.setdefault("stale_after_seconds", self.DEFAULT_STALE_AFTER_SECONDS)
        super().__init__(zone_label=location, fallback=fallback, **polling)
        self.location = location
        self.marginal = marginal
        self._base_url = base_url.rstrip("/")
        self._token = token
        self.fetch_forecast = forecast

    def secret_values(self) -> tuple[str, ...]:
        return (self._token.reveal(),) if self._token is not None else ()

    async def fetch(self) -> list[IntensityPoint]:
        now = self._clock()
        params = {
            "location": self.location,
            "time": format_iso8601(now - self.LOOKBACK_SECONDS),
            "toTime": format_iso8601(now),
        }
        headers = {"Authorization": f"Bearer {self._token.reveal()}"} if self._token is not None else None
        points = parse_emissions(await self.get_json(f"{self._base_url}/emissions/bylocation", params=params, headers=headers))
        if self.fetch_forecast and points:
            newest = max(p.valid_from_unix for p in points)
            try:
                body = await self.get_json(f"{self._base_url}/emissions/forecasts/current", params={"location": self.location}, headers=headers)
                ahead = parse_forecasts(body)
            except Exception as exc:  # the forecast is a bonus; the measured value still counts
                log.debug("carbonaware forecast for %s unavailable: %s", self.location, type(exc).__name__)
            else:
                points += [p for p in ahead if p.valid_from_unix > newest]
        return points


def parse_forecasts(body: Any) -> list[IntensityPoint]:
    """forecastData of the first EmissionsForecastDTO, flagged estimated."""
    if not isinstance(body, list) or not body or not isinstance(body[0], dict):
        raise MalformedResponse("expected a JSON array of forecasts")
    data = body[0].get("forecastData")
    if not isinstance(data, list):
        raise MalformedResponse("forecast without a 'forecastData' list")
    return [
        IntensityPoint(parse_iso8601(item.get("timestamp")), intensity_number(item.get("value"), "forecast value"), estimated=True)
        for item in data
        if isinstance(item, dict) and item.get("value") != -1
    ]


def parse_emissions(body: Any) -> list[IntensityPoint]:
    if not isinstance(body, list):
        raise MalformedResponse("expected a JSON array of emissions data")
    points = []
    for item in body:
        if not isinstance(item, dict):
            raise MalformedResponse("emissions item is not an object")
        rating = item.get("rating")
        if isinstance(rating, (int, float)) and not isinstance(rating, bool) and rating == -1:
            continue  # the SDK's "no value" marker
        points.append(IntensityPoint(parse_iso8601(item.get("time")), intensity_number(rating, "rating")))
    if body and not points:
        raise NoData("every point has rating -1 (no value)")
    return points
