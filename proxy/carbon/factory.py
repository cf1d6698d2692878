"""Build the intensity provider and embodied model from `[carbon]` config or a CLI flag.

Every invalid value raises ConfigError with the dotted key, so `check-config` and
`serve` can say exactly what to fix (exit code 2 is the CLI's business).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Mapping

import aiohttp

from proxy.carbon.credentials import load_secret
from proxy.carbon.intensity import ConstantIntensity, IntensityProvider
from proxy.carbon.providers.carbonaware import CarbonAwareSdkProvider
from proxy.carbon.providers.electricitymaps import ElectricityMapsProvider
from proxy.carbon.providers.parsing import MAX_PLAUSIBLE_G_PER_KWH
from proxy.carbon.providers.ukgrid import REGION_IDS, UkGridProvider, is_northern_ireland, outward_code
from proxy.carbon.providers.watttime import WattTimeProvider
from proxy.carbon.table import TableIntensity, country_for_zone, find_zone
from proxy.carbon.traces import TraceIntensity
from proxy.errors import ConfigError

log = logging.getLogger("proxy.carbon")

PROVIDERS = ("constant", "table", "electricitymaps", "watttime", "ukgrid", "carbonaware", "sim")

INTENSITY_KEYS = frozenset({
    "intensity", "provider", "zone", "fallback_zone", "poll_seconds", "stale_after_seconds",
    "timeout_seconds", "startup_wait_seconds", "url", "login_url", "token_env", "token_file",
    "username_env", "username_file", "password_env", "password_file", "forecast", "region_id",
    "postcode", "location", "marginal", "day_seconds",
})
EMBODIED_KEYS = frozenset({"embodied", "device_model", "device_kg", "lifetime_years", "server_kg", "gpus_per_server"})
CARBON_KEYS = INTENSITY_KEYS | EMBODIED_KEYS | {"pue"}
"""Every key `[carbon]` may hold; anything else is reported as a likely typo."""

DEFAULT_TIMEOUT_SECONDS = 10.0


def _key(name: str) -> str:
    return f"carbon.{name}"


def _intensity_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(key, f"expected gCO2e/kWh as a number, got {value!r}")
    number = float(value)
    if number < 0 or number > MAX_PLAUSIBLE_G_PER_KWH:
        raise ConfigError(key, f"{number:g} gCO2e/kWh is outside 0..{MAX_PLAUSIBLE_G_PER_KWH:g}")
    return number


def parse_intensity_flag(value: str) -> IntensityProvider:
    """`--intensity NUMBER|ZONE`: a number is a constant, anything else a table zone."""
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        return TableIntensity(text, key="--intensity")
    return ConstantIntensity(_intensity_number(number, "--intensity"))


def _str(carbon: Mapping[str, Any], name: str, default: str | None = None) -> str | None:
    value = carbon.get(name, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(_key(name), f"expected a non-empty string, got {value!r}")
    return value.strip()


def _seconds(carbon: Mapping[str, Any], name: str, default: float) -> float:
    value = carbon.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)) or value <= 0:
        raise ConfigError(_key(name), f"expected a number of seconds > 0, got {value!r}")
    return float(value)


def _bool(carbon: Mapping[str, Any], name: str, default: bool) -> bool:
    value = carbon.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(_key(name), f"expected true or false, got {value!r}")
    return value


def _fallback(carbon: Mapping[str, Any], guess: str | None, provider: str) -> TableIntensity:
    explicit = _str(carbon, "fallback_zone")
    if explicit is not None:
        return TableIntensity(explicit, key=_key("fallback_zone"))
    if guess is not None and find_zone(guess) is not None:
        return TableIntensity(guess)
    log.warning(
        "carbon.fallback_zone is not set and the %s zone names no country; outages fall back to the"
        " world average (table:WORLD). Set carbon.fallback_zone, e.g. \"USA\" or \"aws:us-east-1\".",
        provider,
    )
    return TableIntensity.world()


def build_intensity_provider(
    carbon: Mapping[str, Any] | None,
    *,
    environ: Mapping[str, str] | None = None,
    session: aiohttp.ClientSession | None = None,
    clock: Callable[[], float] = time.time,
) -> IntensityProvider:
    """The provider `[carbon]` describes. Nothing configured: the table's world average."""
    carbon = dict(carbon or {})
    unknown = sorted(set(carbon) - CARBON_KEYS)
    if unknown:
        raise ConfigError(_key(unknown[0]), f"unknown key; [carbon] takes {', '.join(sorted(CARBON_KEYS))}")
    provider = _str(carbon, "provider")
    if provider is not None and provider not in PROVIDERS:
        raise ConfigError(_key("provider"), f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    intensity = carbon.get("intensity")
    if intensity is not None and provider not in (None, "constant", "table"):
        raise ConfigError(_key("intensity"), f"a constant intensity and provider = {provider!r} exclude each other; remove one")
    if provider in (None, "constant") and intensity is not None:
        if isinstance(intensity, str):  # same forms as --intensity: a zone is a table lookup
            return TableIntensity(intensity, key=_key("intensity"))
        return ConstantIntensity(_intensity_number(intensity, _key("intensity")))
    if provider == "constant":
        raise ConfigError(_key("intensity"), "provider = \"constant\" needs intensity = <gCO2e/kWh>")
    if provider in (None, "table"):
        zone = _str(carbon, "zone") or (intensity if isinstance(intensity, str) else None) or "WORLD"
        return TableIntensity(zone, key=_key("zone"))

    if provider == "sim":  # a simulated daily trace (proxy.carbon.traces): demo, tests, bench
        day = _seconds(carbon, "day_seconds", 86400.0) if "day_seconds" in carbon else 86400.0
        return TraceIntensity(_str(carbon, "zone") or "SE", day_seconds=day, clock=clock, key=_key("zone"))

    polling: dict[str, Any] = {"clock": clock, "session": session}
    for name in ("poll_seconds", "stale_after_seconds", "startup_wait_seconds"):
        if name in carbon:
            polling[name] = _seconds(carbon, name, 1.0)
    polling["timeout_seconds"] = _seconds(carbon, "timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
    url = _str(carbon, "url")

    if provider == "electricitymaps":
        zone = _require(carbon, "zone", "an Electricity Maps zone, e.g. \"DE\" or \"US-CAL-CISO\"")
        token = load_secret(
            env_key=_key("token_env"), env_name=_str(carbon, "token_env", "ELECTRICITYMAPS_TOKEN"),
            file_key=_key("token_file"), file_path=_str(carbon, "token_file"),
            what="Electricity Maps API token", environ=environ,
        )
        assert token is not None
        return ElectricityMapsProvider(
            zone, token, fallback=_fallback(carbon, country_for_zone(zone), provider),
            base_url=url or ElectricityMapsProvider.DEFAULT_URL, forecast=_bool(carbon, "forecast", False), **polling,
        )
    if provider == "watttime":
        region = _require(carbon, "zone", "a WattTime region, e.g. \"CAISO_NORTH\"")
        username = load_secret(
            env_key=_key("username_env"), env_name=_str(carbon, "username_env", "WATTTIME_USER"),
            file_key=_key("username_file"), file_path=_str(carbon, "username_file"),
            what="WattTime username", environ=environ,
        )
        password = load_secret(
            env_key=_key("password_env"), env_name=_str(carbon, "password_env", "WATTTIME_PASSWORD"),
            file_key=_key("password_file"), file_path=_str(carbon, "password_file"),
            what="WattTime password", environ=environ,
        )
        assert username is not None and password is not None
        return WattTimeProvider(
            region, username, password, fallback=_fallback(carbon, country_for_zone(region), provider),
            base_url=url or WattTimeProvider.DEFAULT_URL,
            login_url=_str(carbon, "login_url") or WattTimeProvider.DEFAULT_LOGIN_URL,
            forecast=_bool(carbon, "forecast", False), **polling,
        )
    if provider == "ukgrid":
        region_id = carbon.get("region_id")
        postcode = _str(carbon, "postcode")
        if region_id is not None and (isinstance(region_id, bool) or not isinstance(region_id, int) or region_id not in REGION_IDS):
            raise ConfigError(_key("region_id"), f"expected a region id 1..17, got {region_id!r}")
        if region_id is not None and postcode is not None:
            raise ConfigError(_key("postcode"), "set region_id or postcode, not both")
        if postcode is not None and outward_code(postcode) is None:
            raise ConfigError(_key("postcode"), f"{postcode!r} is not a UK postcode (e.g. \"RG10\" or \"SW1A 1AA\")")
        if postcode is not None and is_northern_ireland(outward_code(postcode) or ""):
            raise ConfigError(
                _key("postcode"),
                f"{postcode!r} is in Northern Ireland, which the UK Carbon Intensity API does not cover "
                "(Great Britain only); use provider = \"electricitymaps\" with zone = \"GB-NIR\", or zone = \"GBR\" from the table",
            )
        return UkGridProvider(
            fallback=_fallback(carbon, "GBR", provider), region_id=region_id, postcode=postcode,
            base_url=url or UkGridProvider.DEFAULT_URL, forecast=_bool(carbon, "forecast", False), **polling,
        )
    # carbonaware
    location = _str(carbon, "location") or _require(carbon, "zone", "a location your WebAPI knows, e.g. \"eastus\"")
    if url is None:
        raise ConfigError(_key("url"), "the Carbon Aware SDK WebAPI is self-hosted; set the URL of yours, e.g. \"http://127.0.0.1:8090\"")
    token_env, token_file = _str(carbon, "token_env"), _str(carbon, "token_file")
    token = load_secret(
        env_key=_key("token_env"), env_name=token_env, file_key=_key("token_file"), file_path=token_file,
        what="Carbon Aware WebAPI token", environ=environ, required=bool(token_env or token_file),
    )
    guess = f"azure:{location}" if find_zone(f"azure:{location}") else country_for_zone(location)
    return CarbonAwareSdkProvider(
        location, base_url=url, fallback=_fallback(carbon, guess, provider), token=token,
        marginal=_bool(carbon, "marginal", False), forecast=_bool(carbon, "forecast", False), **polling,
    )


def _require(carbon: Mapping[str, Any], name: str, what: str) -> str:
    value = _str(carbon, name)
    if value is None:
        provider = carbon.get("provider")
        raise ConfigError(_key(name), f"provider = {provider!r} needs {name} = {what}")
    return value
