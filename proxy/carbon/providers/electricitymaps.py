"""Electricity Maps API v3: `auth-token` header, `/carbon-intensity/latest?zone=`.

Host: `https://api.electricitymaps.com/v3`, the one the current docs name (the legacy
`api.electricitymap.org` redirects; redirects are never followed, and a 3xx is reported
as a configuration error naming `carbon.url`). For a zone it has no data for, the API
may answer for the caller's IP location instead; the request turns that lookup off
(`disableCallerLookup=true`, the current docs' name, and `shouldUseFallbackCallerLookup=false`,
the older one; an unknown parameter is ignored), and an answer for another zone is
refused all the same: the last good value, then the table, with one warning.

Response shape (v3 docs and public clients):
    {"zone": "DE", "carbonIntensity": 302, "datetime": "2019-05-21T00:00:00.000Z",
     "updatedAt": "...", "emissionFactorType": "lifecycle", "isEstimated": false, ...}
The optional forecast endpoint answers {"zone": "DE", "forecast": [{"carbonIntensity": 77,
"datetime": "..."}, ...], "updatedAt": "..."}; forecast points are marked estimated and a
later `latest` for the same hour replaces them.
"""

from __future__ import annotations

import logging
from typing import Any

from proxy.carbon.credentials import Secret
from proxy.carbon.providers.parsing import MalformedResponse, intensity_number, parse_iso8601
from proxy.carbon.providers.polling import IntensityPoint, PollingProvider, ProviderError, Unauthorized
from proxy.carbon.table import TableIntensity

log = logging.getLogger("proxy.carbon.intensity")


class ElectricityMapsProvider(PollingProvider):
    provider_name = "electricitymaps"
    credential_hint = "the Electricity Maps token (carbon.token_env or carbon.token_file)"

    DEFAULT_URL = "https://api.electricitymaps.com/v3"
    RESOLUTION_SECONDS = 3600.0
    DEFAULT_POLL_SECONDS = 900.0
    """Hourly data: polling every 15 minutes sees a new hour at most a quarter-interval late."""
    DEFAULT_STALE_AFTER_SECONDS = 3 * 3600.0

    def __init__(
        self,
        zone: str,
        token: Secret,
        *,
        fallback: TableIntensity,
        base_url: str = DEFAULT_URL,
        forecast: bool = False,
        **polling: Any,
    ) -> None:
        polling.setdefault("poll_seconds", self.DEFAULT_POLL_SECONDS)
        polling.setdefault("stale_after_seconds", self.DEFAULT_STALE_AFTER_SECONDS)
        super().__init__(zone_label=zone, fallback=fallback, **polling)
        self.zone = zone
        self._token = token
        self._base_url = base_url.rstrip("/")
        self.fetch_forecast = forecast

    def secret_values(self) -> tuple[str, ...]:
        return (self._token.reveal(),)

    async def _get(self, path: str) -> Any:
        url = f"{self._base_url}/{path}"
        params = {"zone": self.zone, "disableCallerLookup": "true", "shouldUseFallbackCallerLookup": "false"}
        try:
            return await self.get_json(url, params=params, headers={"auth-token": self._token.reveal()})
        except Unauthorized:
            if not self._token.reload():  # a rotated key in token_file gets one more try
                raise
            return await self.get_json(url, params=params, headers={"auth-token": self._token.reveal()})

    async def fetch(self) -> list[IntensityPoint]:
        body = await self._get("carbon-intensity/latest")
        check_zone(body, self.zone)
        latest = parse_latest(body)
        points = [latest]
        if self.fetch_forecast:
            try:
                body = await self._get("carbon-intensity/forecast")
                check_zone(body, self.zone)
                forecast = parse_forecast(body)
            except Exception as exc:  # the forecast is a bonus; the latest value still counts
                log.debug("electricitymaps forecast for %s unavailable: %s", self.zone, type(exc).__name__)
            else:
                points += [p for p in forecast if p.valid_from_unix > latest.valid_from_unix]
        return points


class WrongZone(ProviderError):
    """The API answered for another zone than the one asked for (its caller-IP fallback)."""


def check_zone(body: Any, zone: str) -> None:
    answered = body.get("zone") if isinstance(body, dict) else None
    if isinstance(answered, str) and answered.upper() != zone.upper():
        raise WrongZone(f"answered for zone {answered[:20]!r}, not {zone!r}: no data for {zone!r}, refusing another zone's value")


def parse_latest(body: Any) -> IntensityPoint:
    if not isinstance(body, dict):
        raise MalformedResponse("expected a JSON object")
    value = intensity_number(body.get("carbonIntensity"), "carbonIntensity")
    return IntensityPoint(
        valid_from_unix=parse_iso8601(body.get("datetime")),
        g_per_kwh=value,
        estimated=bool(body.get("isEstimated", False)),
    )


def parse_forecast(body: Any) -> list[IntensityPoint]:
    if not isinstance(body, dict) or not isinstance(body.get("forecast"), list):
        raise MalformedResponse("expected an object with a 'forecast' list")
    return [
        IntensityPoint(
            valid_from_unix=parse_iso8601(item.get("datetime")),
            g_per_kwh=intensity_number(item.get("carbonIntensity"), "forecast carbonIntensity"),
            estimated=True,
        )
        for item in body["forecast"]
        if isinstance(item, dict)
    ]
