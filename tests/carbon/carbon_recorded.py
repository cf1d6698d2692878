"""Response bodies in the shapes the real APIs publish (field names, nesting, timestamp styles).

Values are made up; shapes follow each API's documentation and public clients:
Electricity Maps v3 latest/forecast, WattTime v3 login + forecast, UK Carbon Intensity
national and regional, Carbon Aware SDK WebAPI /emissions/bylocation.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def iso_ms_z(unix: float) -> str:
    """Electricity Maps style: 2019-05-21T00:00:00.000Z."""
    return datetime.fromtimestamp(unix, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def iso_offset(unix: float) -> str:
    """WattTime style: 2024-04-01T00:00:00+00:00."""
    return datetime.fromtimestamp(unix, tz=timezone.utc).isoformat()


def iso_minute_z(unix: float) -> str:
    """UK Carbon Intensity style: 2018-01-20T12:00Z."""
    return datetime.fromtimestamp(unix, tz=timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


def iso_dotnet(unix: float) -> str:
    """Carbon Aware SDK (.NET) style: 2022-05-17T20:45:11.5092741+00:00."""
    return datetime.fromtimestamp(unix, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0+00:00"


def hour_start(unix: float) -> float:
    return unix - unix % 3600


def em_latest(zone: str, g_per_kwh: float, at_unix: float, *, estimated: bool = False) -> dict[str, Any]:
    return {
        "zone": zone,
        "carbonIntensity": g_per_kwh,
        "datetime": iso_ms_z(at_unix),
        "updatedAt": iso_ms_z(at_unix + 300),
        "createdAt": iso_ms_z(at_unix - 86400),
        "emissionFactorType": "lifecycle",
        "isEstimated": estimated,
        "estimationMethod": "TIME_SLICER_AVERAGE" if estimated else None,
    }


def em_forecast(zone: str, points: list[tuple[float, float]]) -> dict[str, Any]:
    return {
        "zone": zone,
        "forecast": [{"carbonIntensity": g, "datetime": iso_ms_z(t)} for t, g in points],
        "updatedAt": iso_ms_z(points[0][0]),
    }


def wt_login(token: str) -> dict[str, Any]:
    return {"token": token}


def wt_forecast(region: str, points: list[tuple[float, float]], *, units: str = "lbs_co2_per_mwh") -> dict[str, Any]:
    return {
        "data": [{"point_time": iso_offset(t), "value": v, "version": "2024-03-01"} for t, v in points],
        "meta": {
            "data_point_period_seconds": 300,
            "region": region,
            "warnings": [],
            "signal_type": "co2_moer",
            "model": {"date": "2024-03-01"},
            "units": units,
            "generated_at_period_seconds": 300,
            "generated_at": iso_offset(points[0][0]),
        },
    }


def uk_national(from_unix: float, forecast: int, actual: int | None) -> dict[str, Any]:
    return {
        "data": [
            {
                "from": iso_minute_z(from_unix),
                "to": iso_minute_z(from_unix + 1800),
                "intensity": {"forecast": forecast, "actual": actual, "index": "moderate"},
            }
        ]
    }


def uk_regional(region_id: int, from_unix: float, forecast: int, *, postcode: str | None = None) -> dict[str, Any]:
    region: dict[str, Any] = {
        "regionid": region_id,
        "dnoregion": "UKPN London",
        "shortname": "London",
        "data": [
            {
                "from": iso_minute_z(from_unix),
                "to": iso_minute_z(from_unix + 1800),
                "intensity": {"forecast": forecast, "index": "low"},
                "generationmix": [{"fuel": "gas", "perc": 40.1}, {"fuel": "wind", "perc": 30.3}],
            }
        ],
    }
    if postcode is not None:
        region["postcode"] = postcode
    return {"data": [region]}


def ca_bylocation(location: str, points: list[tuple[float, float]]) -> list[dict[str, Any]]:
    return [{"location": location, "time": iso_dotnet(t), "rating": r, "duration": "00:05:00"} for t, r in points]
