"""WattTime API v3: marginal operating emissions rate (co2_moer), lbs/MWh.

Flow (WattTime's own client and docs): GET /login with HTTP Basic auth answers
{"token": "..."} valid for 30 minutes; data calls send `Authorization: Bearer <token>`.
The current value comes from GET /v3/forecast?region=&signal_type=co2_moer&horizon_hours=0:
    {"data": [{"point_time": "2024-04-01T00:00:00+00:00", "value": 870.0}, ...],
     "meta": {"region": "CAISO_NORTH", "signal_type": "co2_moer",
              "units": "lbs_co2_per_mwh", "data_point_period_seconds": 300, ...}}
With `horizon_hours=0` the answer holds one point: the first point of the newest
forecast, so it is flagged estimated like every forecast value (WattTime serves no
measured real-time MOER on v3; `/v3/historical` is the model's own estimate too).
Values are converted to g/kWh (x 0.45359237) and flagged marginal: a MOER says what one
more kWh emits now, not the average mix a location-based inventory uses.
A 401 means the token expired: log in again once. A 403 means the account's plan does
not cover this region or signal (the spec's answer for a non-subscriber outside
CAISO_NORTH): logging in again cannot help, so the token is kept and the poller backs off.
"""

from __future__ import annotations

import base64
from typing import Any

from proxy.carbon.credentials import Secret
from proxy.carbon.providers.parsing import (
    MalformedResponse,
    intensity_number,
    lbs_per_mwh_to_g_per_kwh,
    parse_iso8601,
)
from proxy.carbon.providers.polling import IntensityPoint, PollingProvider, Unauthorized
from proxy.carbon.table import TableIntensity

_LBS_UNITS = {"lbs_co2_per_mwh", "lbs_per_mwh", "lbs/mwh"}
_G_UNITS = {"g_co2_per_kwh", "gco2_per_kwh", "g/kwh"}


class WattTimeProvider(PollingProvider):
    provider_name = "watttime"
    marginal = True
    credential_hint = "the WattTime username and password (carbon.username_env / carbon.password_env)"

    @property
    def forbidden_what(self) -> str:
        return f"region {self.region!r} with signal {self.signal_type!r} (check /v3/my-access)"

    DEFAULT_URL = "https://api.watttime.org/v3"
    DEFAULT_LOGIN_URL = "https://api.watttime.org/login"
    RESOLUTION_SECONDS = 300.0
    DEFAULT_POLL_SECONDS = 300.0
    DEFAULT_STALE_AFTER_SECONDS = 1800.0
    FORECAST_HOURS = 24
    TOKEN_REFRESH_SECONDS = 25 * 60.0
    """Tokens live 30 minutes; renew a little early so a poll never uses an expiring one."""

    def __init__(
        self,
        region: str,
        username: Secret,
        password: Secret,
        *,
        fallback: TableIntensity,
        base_url: str = DEFAULT_URL,
        login_url: str = DEFAULT_LOGIN_URL,
        signal_type: str = "co2_moer",
        forecast: bool = False,
        **polling: Any,
    ) -> None:
        polling.setdefault("poll_seconds", self.DEFAULT_POLL_SECONDS)
        polling.setdefault("stale_after_seconds", self.DEFAULT_STALE_AFTER_SECONDS)
        super().__init__(zone_label=region, fallback=fallback, **polling)
        self.region = region
        self.signal_type = signal_type
        self.fetch_forecast = forecast
        """Ask for FORECAST_HOURS ahead (one request either way): proxy.carbon.forecast reads them."""
        self._username = username
        self._password = password
        self._base_url = base_url.rstrip("/")
        self._login_url = login_url
        self._token: Secret | None = None
        self._token_unix = 0.0
        self.logins = 0
        """How many times this provider logged in (token refreshes included)."""

    def secret_values(self) -> tuple[str, ...]:
        values = [self._username.reveal(), self._password.reveal()]
        if self._token is not None:
            values.append(self._token.reveal())
        return tuple(values)

    async def _login(self) -> Secret:
        pair = f"{self._username.reveal()}:{self._password.reveal()}".encode()
        headers = {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
        try:
            body = await self.get_json(self._login_url, headers=headers)
        except Unauthorized as exc:
            raise Unauthorized(exc.status, "the WattTime login") from None
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise MalformedResponse("login answer has no token")
        self.logins += 1
        self._token = Secret(token)
        self._token_unix = self._clock()
        return self._token

    async def _token_now(self) -> Secret:
        if self._token is None or self._clock() - self._token_unix >= self.TOKEN_REFRESH_SECONDS:
            return await self._login()
        return self._token

    async def _data(self, token: Secret) -> Any:
        horizon = str(self.FORECAST_HOURS) if self.fetch_forecast else "0"
        params = {"region": self.region, "signal_type": self.signal_type, "horizon_hours": horizon}
        headers = {"Authorization": f"Bearer {token.reveal()}"}
        return await self.get_json(f"{self._base_url}/forecast", params=params, headers=headers)

    async def fetch(self) -> list[IntensityPoint]:
        token = await self._token_now()
        try:
            body = await self._data(token)
        except Unauthorized:
            # The token expired early or was revoked: log in again once, then give up.
            self._token = None
            body = await self._data(await self._login())
        return parse_moer(body)


def parse_moer(body: Any) -> list[IntensityPoint]:
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise MalformedResponse("expected an object with a 'data' list")
    meta = body.get("meta") if isinstance(body.get("meta"), dict) else {}
    units = str(meta.get("units", "lbs_co2_per_mwh")).lower()
    if units in _LBS_UNITS:
        convert = lbs_per_mwh_to_g_per_kwh
    elif units in _G_UNITS:
        convert = float
    else:
        raise MalformedResponse(f"unknown units {units[:40]!r}")
    points: list[IntensityPoint] = []
    for item in body["data"]:
        if not isinstance(item, dict):
            raise MalformedResponse("data item is not an object")
        raw = item.get("value")
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise MalformedResponse("value is not a number")
        points.append(
            IntensityPoint(
                valid_from_unix=parse_iso8601(item.get("point_time")),
                g_per_kwh=intensity_number(convert(raw), "co2_moer"),
            )
        )
    points.sort(key=lambda p: p.valid_from_unix)
    # Every point of /v3/forecast is a forecast, the horizon-0 one included.
    return [IntensityPoint(p.valid_from_unix, p.g_per_kwh, estimated=True) for p in points]
